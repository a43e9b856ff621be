"""SFT, the No-KD control: the student fine-tuned on the records' responses with cross-entropy, no teacher."""
from kdfast.distill.techniques.base import DivergenceTechnique


class SFT(DivergenceTechnique):
    """Cross-entropy on ground-truth responses (kd_ratio = 0); docs/design.md §7 defaults: lr 5e-5, 5 epochs."""

    name = "sft"
    needs_teacher = False
