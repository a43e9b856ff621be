"""The distillation trainer: SFT, KD, SeqKD, ImitKD, GKD, MiniLLM, DistiLLM on any HF causal LM (docs/design.md §7)."""
from kdfast.distill.config import TECHNIQUES, DistillConfig, DistillError
from kdfast.distill.loop import Distiller, DistillSummary
from kdfast.distill.student import make_student

__all__ = ["TECHNIQUES", "DistillConfig", "DistillError", "DistillSummary", "Distiller", "make_student"]
