"""Universal Logit Distillation (Boizard et al., 2024) between models with different vocabularies: the autograd op,
chunked over tokens on the torch backend, with closed-form gradients computed in the forward."""
from __future__ import annotations

import dataclasses
import math

import torch

from kdfast import reference
from kdfast.ops._checks import (
    check_choice,
    check_float,
    check_labels,
    check_same_device,
    check_temperature,
    raise_if_nonfinite,
)
from kdfast.ops.divergence import (
    BAD_STUDENT,
    BAD_TEACHER,
    REDUCTIONS,
    mean_scale,
)
from kdfast.runtime import ULD_CHUNK_ELEMENTS

BACKENDS = ("auto", "torch", "reference")


@dataclasses.dataclass(frozen=True)
class _UldArgs:
    """The non-tensor arguments of one uld_loss call."""

    top_k: int | None
    temperature: float
    ignore_index: int
    reduction: str
    grad_enabled: bool


def uld_fwd_bwd(student: torch.Tensor, teacher: torch.Tensor, *, top_k: int | None = None,
                temperature: float = 1.0, student_log_scale: torch.Tensor | None = None,
                teacher_log_scale: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                want_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Per-row ULD and its gradients for one [n, Vs] / [n, Vt] pair of logit blocks, in token chunks.

    Returns (loss [n] fp32/fp64, ∂loss/∂student [n, Vs] in the student dtype or None, ∂loss/∂student_log_scale
    [n] or None, bad [n] int32). Rows where valid [n] bool is False give 0 and zero gradients. Each chunk holds the
    softmax of its student rows and the top entries of both sides, never full [n, V] fp32 matrices.
    """
    n, vs = student.shape
    vt = teacher.shape[1]
    width = max(vs, vt)
    k = width if top_k is None else min(top_k, width)
    cdtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    loss = torch.zeros(n, dtype=cdtype, device=student.device)
    bad = torch.zeros(n, dtype=torch.int32, device=student.device)
    grad = torch.zeros_like(student) if want_grad else None
    grad_scale = torch.zeros_like(loss) if want_grad and student_log_scale is not None else None
    rows = max(1, ULD_CHUNK_ELEMENTS // width)
    for i in range(0, n, rows):
        sl = slice(i, min(i + rows, n))
        cs = None if student_log_scale is None else student_log_scale[sl].to(cdtype)
        ct = None if teacher_log_scale is None else teacher_log_scale[sl].to(cdtype)
        x = _scaled(student[sl], temperature, cdtype)
        y = _scaled(teacher[sl], temperature, cdtype)
        keep = None if valid is None else valid[sl]
        flags = _nonfinite(x) * BAD_STUDENT + _nonfinite(y) * BAD_TEACHER
        bad[sl] = flags if keep is None else flags.where(keep, 0)
        lse_x = _safe_lse(x)
        a, idx = _top_probs(x, lse_x, min(k, vs), cs)
        b, _ = _top_probs(y, _safe_lse(y), min(k, vt), ct)
        diff = _pad(a, k) - _pad(b, k)
        f = diff.abs().sum(-1)
        loss[sl] = f if keep is None else f.where(keep, 0.0)
        if grad is None:
            continue
        # ∂L/∂a_(j) = sign(a_(j) − b_(j)); a = e^c·q, so ∂L/∂c = Σ sign·a and ∂L/∂x = (scatter(sign·a) − q·∂L/∂c) / T.
        signed = diff[:, : a.shape[1]].sign_().mul_(a)
        d_c = signed.sum(-1)
        if keep is not None:
            signed.masked_fill_(~keep.unsqueeze(-1), 0.0)
            d_c = d_c.where(keep, 0.0)
        g = (x - lse_x.unsqueeze(-1)).exp_().mul_(-d_c.unsqueeze(-1)).scatter_add_(1, idx, signed)
        if keep is not None:
            g.masked_fill_(~keep.unsqueeze(-1), 0.0)  # also clears the NaN of an ignored non-finite row
        grad[sl] = g.div_(temperature)
        if grad_scale is not None:
            grad_scale[sl] = d_c
    return loss, grad, grad_scale, bad


def _scaled(x: torch.Tensor, temperature: float, cdtype: torch.dtype) -> torch.Tensor:
    x = x.to(cdtype)
    return x if temperature == 1.0 else x / temperature


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    row_max = x.amax(-1)
    return (torch.isnan(row_max) | (row_max == math.inf)).to(torch.int32)


def _safe_lse(x: torch.Tensor) -> torch.Tensor:
    """Row logsumexp, 0 for a row with no finite entry (its probabilities all come out 0, not NaN)."""
    lse = torch.logsumexp(x, -1)
    return lse.masked_fill(lse == -math.inf, 0.0)


def _top_probs(x: torch.Tensor, lse: torch.Tensor, k: int, log_scale: torch.Tensor | None):
    """The k largest e^c·softmax(x) entries of each row, in decreasing order, and their column indices."""
    # softmax is monotone: ranking the logits ranks the probabilities, and topk beats a full sort for k ≪ V.
    vals, idx = (x.sort(-1, descending=True) if k == x.shape[1] else x.topk(k, -1))
    shift = lse if log_scale is None else lse - log_scale
    return (vals - shift.unsqueeze(-1)).exp_(), idx


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().reshape(-1)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[1] == width else torch.nn.functional.pad(x, (0, width - x.shape[1]))


class ULDLossFunction(torch.autograd.Function):
    """Loss and gradients computed together in the forward; the backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, student, teacher, labels, student_log_scale, teacher_log_scale, spec: _UldArgs):
        lead = student.shape[:-1]
        s2 = student.detach().reshape(-1, student.shape[-1])
        t2 = teacher.detach().reshape(-1, teacher.shape[-1])
        labels_f = _flat(labels)
        valid = None if labels_f is None else labels_f != spec.ignore_index
        want = spec.grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3])
        loss, gs, gc, bad = uld_fwd_bwd(s2, t2, top_k=spec.top_k, temperature=spec.temperature,
                                        student_log_scale=_flat(student_log_scale),
                                        teacher_log_scale=_flat(teacher_log_scale), valid=valid, want_grad=want)
        raise_if_nonfinite(bad, BAD_STUDENT, BAD_TEACHER)
        scale = mean_scale(labels_f, s2.shape[0], spec.ignore_index) if spec.reduction == "mean" else 1.0
        if gs is not None and spec.reduction == "mean":
            gs = gs.mul_(scale) if isinstance(scale, float) else gs.mul_(scale.to(gs.dtype))
            gc = None if gc is None else gc * scale
        ctx.save_for_backward(gs, gc)
        ctx.shapes = (student.shape, lead)
        if spec.reduction == "none":
            return loss.reshape(lead)
        return (loss.sum() * scale).to(loss.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        gs, gc = ctx.saved_tensors
        shape, lead = ctx.shapes
        go = grad_output.reshape(-1) if grad_output.dim() else grad_output
        grad_s = grad_c = None
        if gs is not None and ctx.needs_input_grad[0]:
            grad_s = (gs * (go.unsqueeze(-1) if go.dim() else go).to(gs.dtype)).view(shape)
        if gc is not None and ctx.needs_input_grad[3]:
            grad_c = (gc * go.to(gc.dtype)).view(lead)
        return grad_s, None, None, grad_c, None, None


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, top_k: int | None = None,
             temperature: float = 1.0, labels: torch.Tensor | None = None, ignore_index: int = -100,
             reduction: str = "mean", student_log_scale: torch.Tensor | None = None,
             teacher_log_scale: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """ULD loss: L1 distance between the decreasingly sorted probability vectors of student and teacher.

    student_logits [N, Vs] / [B, T, Vs] and teacher_logits [N, Vt] / [B, T, Vt] (fp32, bf16, fp16 or fp64; Vs and
    Vt may differ: the shorter sorted vector is padded with zeros); rows are aligned positions
    (kdfast.distill.align). top_k: compare only the k largest sorted entries (None: all max(Vs, Vt)).
    labels [N] / [B, T] int: rows equal to ignore_index are masked. student_log_scale / teacher_log_scale
    [N] / [B, T] float or None multiply each side's probabilities by e^scale (merged tokens; the student's is
    differentiable). reduction: mean over valid rows, sum, or none. Returns fp32 (fp64 for fp64 inputs).
    backend: torch (token-chunked, gradient in the forward, in the student dtype), reference (float64 formula
    via autograd), auto (torch). Raises ValueError on bad arguments and on NaN/+inf logits in a row.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    check_temperature(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"uld top_k must be a positive int or None (all entries), got {top_k!r}")
    if student_logits.dim() < 2 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must be [N, V] / [B, T, V] with equal leading dims "
                         "(one row per aligned position; the vocabularies may differ)")
    lead = student_logits.shape[:-1]
    check_labels(labels, lead)
    for name, scale in (("student_log_scale", student_log_scale), ("teacher_log_scale", teacher_log_scale)):
        if scale is not None and scale.shape != lead:
            raise ValueError(f"{name} has shape {tuple(scale.shape)}; the logits need {tuple(lead)}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    if backend == "reference":
        return reference.uld_loss(student_logits, teacher_logits.detach(), top_k, temperature, labels, ignore_index,
                                  reduction, student_log_scale, teacher_log_scale)
    allowed = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    check_float("student logits", student_logits, allowed)
    check_float("teacher logits", teacher_logits, allowed)
    spec = _UldArgs(top_k, temperature, ignore_index, reduction, torch.is_grad_enabled())
    return ULDLossFunction.apply(student_logits, teacher_logits, labels, student_log_scale, teacher_log_scale, spec)
