"""KD: token-level divergence to the teacher on the records' responses, r·KD + (1 − r)·CE."""
from kdfast.distill.techniques.base import DivergenceTechnique


class KD(DivergenceTechnique):
    """Forward KL by default (loss="fkl"); any divergence kind for the forward-vs-reverse-KL ablation (loss="rkl").

    kd_ratio r = 1.0 (MiniLLM's repository uses 0.5); student_gen_fraction > 0 mixes in student-generated
    responses for the on-policy ablation.
    """

    name = "kd"
