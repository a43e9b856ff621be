"""GKD: with probability λ the micro-batch is student-generated, else ground truth; generalized JSD(β)."""
from kdfast.distill.techniques.base import DivergenceTechnique


class GKD(DivergenceTechnique):
    """λ = student_gen_fraction (0.5); β = beta (0.1, DistiLLM's convention: its js_distance(lam=0.9) equals
    β = 0.1; TRL's GKDTrainer defaults to β = 0.5). No replay buffer by default, as in TRL and the GKD paper;
    DistiLLM's code also replays for GKD: set buffer_size=1000 to match it."""

    name = "gkd"
