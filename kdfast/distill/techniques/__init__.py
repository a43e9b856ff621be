"""The techniques, one module each, on the shared loop (kdfast.distill.loop)."""
from kdfast.distill.techniques.base import DivergenceTechnique, MicroBatch, Technique
from kdfast.distill.techniques.distillm import DistiLLM
from kdfast.distill.techniques.gkd import GKD
from kdfast.distill.techniques.imitkd import ImitKD
from kdfast.distill.techniques.kd import KD
from kdfast.distill.techniques.minillm import MiniLLM
from kdfast.distill.techniques.seqkd import SeqKD
from kdfast.distill.techniques.sft import SFT

CLASSES: dict[str, type[Technique]] = {c.name: c for c in (SFT, KD, SeqKD, ImitKD, GKD, MiniLLM, DistiLLM)}

__all__ = ["CLASSES", "DivergenceTechnique", "MicroBatch", "Technique", "SFT", "KD", "SeqKD", "ImitKD", "GKD",
           "MiniLLM", "DistiLLM"]
