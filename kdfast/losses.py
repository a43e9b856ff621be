"""nn.Module faces of the distillation losses: configure once, call with logits or with hidden states + heads."""
from __future__ import annotations

import torch
from torch import nn

from kdfast.ops._checks import VOCAB_POLICIES, check_choice, check_temperature, check_unit_interval
from kdfast.ops.divergence import BACKENDS, KINDS, REDUCTIONS, distill_loss
from kdfast.ops.fused_linear import REDUCTIONS as FUSED_REDUCTIONS
from kdfast.ops.fused_linear import fused_linear_distill_loss


def _check_common(kind: str, beta: float, alpha: float, temperature: float, vocab: str, backend: str) -> None:
    check_choice("divergence kind", kind, KINDS)
    check_unit_interval("beta", beta)
    check_unit_interval("alpha", alpha)
    check_temperature(temperature)
    check_choice("vocab policy", vocab, VOCAB_POLICIES)
    check_choice("backend", backend, BACKENDS)


class DistillLoss(nn.Module):
    """kdfast.distill_loss as a module; arguments are checked at construction.

    forward(student_logits [N, V] / [B, T, V], teacher_logits [.., V'], labels [N] / [B, T] or None) -> loss
    (0-dim fp32, or per token for reduction='none').
    """

    def __init__(self, kind: str = "fkl", *, beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", vocab: str = "error", backend: str = "auto",
                 teacher_grad: bool = False, inplace_grad: bool = False, scale_by_t2: bool = False) -> None:
        super().__init__()
        _check_common(kind, beta, alpha, temperature, vocab, backend)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kind, self.beta, self.alpha, self.temperature = kind, beta, alpha, temperature
        self.ignore_index, self.reduction, self.vocab, self.backend = ignore_index, reduction, vocab, backend
        self.teacher_grad, self.inplace_grad, self.scale_by_t2 = teacher_grad, inplace_grad, scale_by_t2

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return distill_loss(student_logits, teacher_logits, self.kind, beta=self.beta, alpha=self.alpha,
                            temperature=self.temperature, labels=labels, ignore_index=self.ignore_index,
                            reduction=self.reduction, vocab=self.vocab, backend=self.backend,
                            teacher_grad=self.teacher_grad, inplace_grad=self.inplace_grad,
                            scale_by_t2=self.scale_by_t2)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, beta={self.beta}, alpha={self.alpha}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class FusedLinearDistillLoss(nn.Module):
    """kdfast.fused_linear_distill_loss as a module: loss = hard_weight·CE + soft_weight·divergence.

    forward(student_hidden [N, Hs] / [B, T, Hs], student_weight [V, Hs], teacher_hidden [.., Ht],
    teacher_weight [V', Ht], labels=None, student_bias=None, teacher_bias=None) -> 0-dim fp32 loss.
    """

    def __init__(self, kind: str = "fkl", *, beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                 ignore_index: int = -100, hard_weight: float = 0.0, soft_weight: float = 1.0,
                 reduction: str = "mean", vocab: str = "error", chunk_size: int | None = None,
                 accum_dtype: torch.dtype | None = None, scale_by_t2: bool = False, backend: str = "auto") -> None:
        super().__init__()
        _check_common(kind, beta, alpha, temperature, vocab, backend)
        check_choice("reduction", reduction, FUSED_REDUCTIONS)
        self.kind, self.beta, self.alpha, self.temperature = kind, beta, alpha, temperature
        self.ignore_index, self.hard_weight, self.soft_weight = ignore_index, hard_weight, soft_weight
        self.reduction, self.vocab, self.chunk_size, self.accum_dtype = reduction, vocab, chunk_size, accum_dtype
        self.scale_by_t2, self.backend = scale_by_t2, backend

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kind=self.kind, beta=self.beta,
            alpha=self.alpha, temperature=self.temperature, ignore_index=self.ignore_index,
            hard_weight=self.hard_weight, soft_weight=self.soft_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, vocab=self.vocab, chunk_size=self.chunk_size, reduction=self.reduction,
            accum_dtype=self.accum_dtype, scale_by_t2=self.scale_by_t2, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, beta={self.beta}, alpha={self.alpha}, temperature={self.temperature}, "
                f"hard_weight={self.hard_weight}, soft_weight={self.soft_weight}, chunk_size={self.chunk_size}")
