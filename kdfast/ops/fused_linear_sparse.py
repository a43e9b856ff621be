"""Fused-linear distillation against a sparse teacher: student hidden states + LM head and cached top-k teacher
log-probs in, loss and gradients out, one token chunk of logits at a time."""
from __future__ import annotations

import dataclasses

import torch

from kdfast.ops._checks import check_float, check_labels, check_same_device
from kdfast.ops._chunks import (
    check_args,
    check_targets,
    chunk_rows,
    chunked_loss,
    loss_dtype,
    scaled_saved,
)
from kdfast.ops.divergence import mean_scale
from kdfast.ops.sparse_divergence import check_sparse_teacher, check_tail, padded_ids, sparse_divergence_fwd_bwd


@dataclasses.dataclass(frozen=True)
class _SparseFusedLinearArgs:
    """The non-tensor arguments of one fused_linear_sparse_distill_loss call."""

    kind: str
    tail: str
    beta: float
    alpha: float
    temperature: float
    ignore_index: int
    hard_weight: float
    soft_weight: float
    reduction: str
    chunk_size: int
    accum_dtype: torch.dtype
    scale_by_t2: bool
    backend: str
    grad_enabled: bool


class FusedLinearSparseDistillFunction(torch.autograd.Function):
    """Forward computes the loss and every gradient chunk by chunk; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None, ids: torch.Tensor,
                log_p: torch.Tensor, labels: torch.Tensor | None, spec: _SparseFusedLinearArgs) -> torch.Tensor:
        hs2 = hs.reshape(-1, hs.shape[-1])
        k = ids.shape[-1]
        ids2, log_p2 = ids.reshape(-1, k), log_p.reshape(-1, k)
        lab = None if labels is None else labels.reshape(-1)
        scale = mean_scale(lab, hs2.shape[0], spec.ignore_index) if spec.reduction == "mean" else 1.0

        def sparse_pass(sl, logits, _, chunk_labels, **pass_args):
            return sparse_divergence_fwd_bwd(logits, ids2[sl], log_p2[sl], chunk_labels, tail=spec.tail, **pass_args)

        return chunked_loss(ctx, spec, (hs, ws, bs), hs2, lab, None, ws.shape[0], scale, sparse_pass)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return *scaled_saved(ctx, grad_output), None, None, None, None


def fused_linear_sparse_distill_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor, labels: torch.Tensor | None = None, kind: str = "fkl", *, tail: str = "bucket",
    beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
    hard_weight: float = 0.0, soft_weight: float = 1.0, student_bias: torch.Tensor | None = None,
    chunk_size: int | None = None, reduction: str = "mean", accum_dtype: torch.dtype | None = None,
    scale_by_t2: bool = False, backend: str = "auto",
) -> torch.Tensor:
    """hard_weight·CE(labels) + soft_weight·sparse divergence(cached teacher ‖ student) from hidden states.

    student_hidden [N, H] / [B, T, H], student_weight [V, H], student_bias [V] (fp32, bf16 or fp16, one dtype);
    teacher_ids [.., k] int and teacher_logprobs [.., k] float: the teacher's top-k ids and their log-probs at
    `temperature` (as kdfast.distill.cache_teacher stores them). The student logits exist one token chunk at a time.
    kind, tail, beta, alpha: as kdfast.sparse_distill_loss; labels, ignore_index, hard_weight, soft_weight,
    chunk_size, reduction (mean | sum), accum_dtype, scale_by_t2, backend: as kdfast.fused_linear_distill_loss.
    Returns a 0-dim fp32 loss (fp64 for fp64 inputs).
    """
    backend, allowed = check_args("fused_linear_sparse_distill_loss", kind, reduction, beta, alpha, temperature,
                                  backend, student_hidden.device)
    check_tail(kind, tail)
    if student_hidden.dim() < 2 or student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and weight {tuple(student_weight.shape)} must "
                         f"be [N, H] / [B, T, H] and [V, H] with equal H")
    check_float("student hidden states", student_hidden, allowed)
    for name, x in (("weight", student_weight), ("bias", student_bias)):
        if x is not None and x.dtype != student_hidden.dtype:
            raise ValueError(f"student {name} is {x.dtype} but its hidden states are {student_hidden.dtype}")
    V = student_weight.shape[0]
    if student_bias is not None and student_bias.shape != (V,):
        raise ValueError(f"student bias {tuple(student_bias.shape)} must be [{V}]")
    lead = student_hidden.shape[:-1]
    check_labels(labels, lead, what="hidden states")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, labels=labels)
    valid = None if labels is None else labels != ignore_index
    check_sparse_teacher(teacher_ids, teacher_logprobs, lead, V, valid)
    check_targets(labels, ignore_index, V, hard_weight)
    spec = _SparseFusedLinearArgs(kind, tail, beta, alpha, temperature, ignore_index, hard_weight, soft_weight,
                                  reduction, chunk_rows(chunk_size, student_hidden, V),
                                  accum_dtype or loss_dtype(student_weight), scale_by_t2, backend,
                                  torch.is_grad_enabled())
    return FusedLinearSparseDistillFunction.apply(student_hidden, student_weight, student_bias,
                                                  padded_ids(teacher_ids, valid), teacher_logprobs.detach(), labels,
                                                  spec)
