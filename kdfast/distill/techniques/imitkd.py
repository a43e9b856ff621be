"""ImitKD: every micro-batch is sampled from the student, forward KL to the teacher, with a replay buffer."""
from kdfast.distill.techniques.base import DivergenceTechnique


class ImitKD(DivergenceTechnique):
    """As the reference code ("mixed" type, mixed_alpha 1.0): each micro-batch's prompts get fresh student
    samples, which enter a FIFO replay buffer (1000 sequences); the micro-batch trained on is drawn from it."""

    name = "imitkd"
