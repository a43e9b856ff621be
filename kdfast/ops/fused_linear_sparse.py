"""Fused-linear distillation against a sparse teacher: student hidden states + LM head and cached top-k teacher
log-probs in, loss and gradients out, one token chunk of logits at a time."""
from __future__ import annotations

import dataclasses

import torch

from kdfast.ops._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_float,
    check_labels,
    check_same_device,
    check_temperature,
    check_unit_interval,
    raise_if_nonfinite,
)
from kdfast.ops.divergence import BAD_STUDENT, BAD_TEACHER, KINDS, mean_scale, resolve_backend
from kdfast.ops.fused_linear import REDUCTIONS, _check_targets, _Grads, _linear, _loss_dtype, pick_chunk_size
from kdfast.ops.sparse_divergence import check_sparse_teacher, check_tail, padded_ids, sparse_divergence_fwd_bwd


@dataclasses.dataclass(frozen=True)
class _Spec:
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
                lp: torch.Tensor, labels: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
        hs2 = hs.reshape(-1, hs.shape[-1])
        k = ids.shape[-1]
        ids2, lp2 = ids.reshape(-1, k), lp.reshape(-1, k)
        lab = None if labels is None else labels.reshape(-1)
        n = hs2.shape[0]
        want_h, want_w, want_b = (spec.grad_enabled and need for need in ctx.needs_input_grad[:3])
        grads = _Grads(hs2, ws, bs, want_h, want_w, want_b, spec.accum_dtype)
        scale = mean_scale(lab, n, spec.ignore_index) if spec.reduction == "mean" else 1.0
        soft = spec.soft_weight * (spec.temperature**2 if spec.scale_by_t2 else 1.0)
        hard = spec.hard_weight if spec.hard_weight != 0.0 else None
        total = torch.zeros((), dtype=_loss_dtype(hs), device=hs.device)
        bad = torch.empty(n, dtype=torch.int32, device=hs.device)
        for i in range(0, n, spec.chunk_size):
            sl = slice(i, min(i + spec.chunk_size, n))
            logits = _linear(hs2[sl], ws, bs)
            out = sparse_divergence_fwd_bwd(
                logits, ids2[sl], lp2[sl], None if lab is None else lab[sl], kind=spec.kind, tail=spec.tail,
                beta=spec.beta, alpha=spec.alpha, temperature=spec.temperature, ignore_index=spec.ignore_index,
                soft_scale=soft * scale, hard_scale=None if hard is None else hard * scale,
                want_student_grad=grads.wanted, student_grad_out=logits, backend=spec.backend)
            total += soft * out.loss.sum()
            if hard is not None:
                total += hard * out.hard_loss.sum()
            bad[sl] = out.bad
            if grads.wanted:
                grads.add_chunk(sl, out.grad_student, hs2[sl], ws)
        raise_if_nonfinite(bad, BAD_STUDENT, BAD_TEACHER)
        ctx.save_for_backward(*grads.finish(hs, ws, bs, None))
        return (total * scale).to(total.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        scaled = [None if g is None else (g if bool(grad_output == 1) else g * grad_output.to(g.dtype))
                  for g in ctx.saved_tensors]
        return scaled[0], scaled[1], scaled[2], None, None, None, None


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
    check_choice("divergence kind", kind, KINDS)
    check_tail(kind, tail)
    check_choice("reduction", reduction, REDUCTIONS)
    check_unit_interval("beta", beta)
    check_unit_interval("alpha", alpha)
    check_temperature(temperature)
    backend = resolve_backend(backend, student_hidden.device)
    if backend == "reference":
        raise ValueError("fused_linear_sparse_distill_loss runs the 'triton' or 'torch' backend (or 'auto')")
    allowed = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
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
    _check_targets(labels, ignore_index, V, hard_weight)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = student_hidden.numel() // student_hidden.shape[-1]
    chunk = chunk_size or pick_chunk_size(n, V, student_hidden.dtype, student_hidden.device)
    spec = _Spec(kind, tail, beta, alpha, temperature, ignore_index, hard_weight, soft_weight, reduction,
                 max(chunk, 1), accum_dtype or _loss_dtype(student_weight), scale_by_t2, backend,
                 torch.is_grad_enabled())
    return FusedLinearSparseDistillFunction.apply(student_hidden, student_weight, student_bias,
                                                  padded_ids(teacher_ids, valid), teacher_logprobs.detach(), labels,
                                                  spec)
