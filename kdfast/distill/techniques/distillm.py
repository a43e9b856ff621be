"""DistiLLM: skew reverse KL with adaptive off-policy student generation and a replay buffer."""
from __future__ import annotations

from kdfast.data import Encoded
from kdfast.distill.techniques.base import DivergenceTechnique


class DistiLLM(DivergenceTechnique):
    """srkl (α = skew_alpha = 0.1) with the reference code's adaptive schedule.

    A threshold (init_threshold = 0) rises by threshold_step (0.1, at most 1) whenever the validation loss is at
    least loss_eps (0.1) above the last reference value. For each micro-batch, with u ~ U(0, 1):
    u < threshold·s(t) (s = 1 − t/T for replay_ratio="decreasing"), or u < threshold while the buffer is not
    full → fresh student samples (also pushed to the buffer); else u < threshold → a batch replayed from the
    buffer; else the records' responses. Without eval records the threshold never rises (all ground truth);
    student_gen_fraction, when set, replaces the schedule by a fixed probability.
    """

    name = "distillm"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.threshold = self.cfg.init_threshold
        self.reference_loss: float | None = None

    def choose(self, examples: list[Encoded], step: int, micro: int) -> tuple[list[Encoded], bool]:
        if self.cfg.student_gen_fraction is not None:
            return super().choose(examples, step, micro)
        rng = self.ctx.rng("data", step, micro)
        u, progress = rng.random(), step / max(self.ctx.total_steps, 1)
        share = {"decreasing": 1.0 - progress, "constant": 0.5, "increasing": progress}[self.cfg.replay_ratio]
        filling = self.buffer is None or not self.buffer.full
        if u < self.threshold * share or (u < self.threshold and filling):
            fresh = self.ctx.generate_student(examples, self.ctx.seed("gen", step, micro))
            if self.buffer is not None:
                self.buffer.push(fresh)
            return fresh, True
        if u < self.threshold:
            return self.buffer.sample(len(examples), rng), True
        return examples, False

    def on_eval(self, eval_loss: float) -> None:
        if self.reference_loss is None:
            self.reference_loss = eval_loss
        elif eval_loss >= self.reference_loss + self.cfg.loss_eps:
            self.threshold = min(1.0, self.threshold + self.cfg.threshold_step)
            self.reference_loss = eval_loss

    def status(self) -> dict[str, float]:
        return {**super().status(), "threshold": self.threshold}

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.reference_loss = state["threshold"], state["reference_loss"]
