"""Divergences against a sparse teacher (its top-k ids and log-probs, e.g. from a teacher cache): the autograd op,
and dispatch to Triton, chunked torch or the reference.

With S the k ids of a token, `bucket` compares both models on the k+1 outcomes S ∪ {rest}; `renorm` (fkl only)
renormalizes the teacher over S and keeps the student's full softmax.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from kdfast import reference
from kdfast.ops._checks import check_choice, check_float, check_labels, check_same_device
from kdfast.ops.divergence import (
    BAD_STUDENT,
    REDUCTIONS,
    DivergenceOut,
    as_rows,
    check_loss_args,
    effective_kind,
    fused_pass_backend,
    mixture,
    nonfinite_flags,
    pass_scales,
    reduced_loss,
    resolve_backend,
    scaled_logits,
    times_grad_output,
    torch_rows,
    torch_terms,
)

TAILS = reference.SPARSE_TAILS
TORCH_CHUNK_ELEMENTS = 1 << 19
# Σ_S p may exceed 1 by rounding of stored fp16 log-probs; more than this means they are not log-probs.
MASS_SLACK = 1e-2


def check_sparse_teacher(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, lead: torch.Size, vocab: int,
                         valid: torch.Tensor | None) -> None:
    """Shapes, dtypes and values of a sparse teacher [..., k]; only valid tokens' ids and log-probs are checked.

    Raises ValueError naming the problem: duplicate ids or ids outside [0, vocab) in a token, NaN or +inf
    log-probs, or probabilities summing to more than 1.
    """
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != lead or teacher_ids.dim() < 2:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must both be [*{tuple(lead)}, k]")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be an integer tensor, got {teacher_ids.dtype}")
    check_float("teacher_logprobs", teacher_logprobs, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    k = teacher_ids.shape[-1]
    if k < 1 or k > vocab:
        raise ValueError(f"teacher top-k has k={k}; it must lie in [1, V={vocab}]")
    ids = teacher_ids.reshape(-1, k)
    log_p = teacher_logprobs.reshape(-1, k)
    if valid is not None:
        keep = valid.reshape(-1)
        ids, log_p = ids[keep], log_p[keep]
    if ids.numel() == 0:
        return
    out_of_range = (ids < 0) | (ids >= vocab)
    if bool(out_of_range.any()):
        row = int(out_of_range.any(-1).nonzero()[0])
        raise ValueError(f"teacher_ids hold ids outside [0, {vocab}) (first in valid token {row}): the cache was "
                         f"made with a larger vocabulary than the student's")
    ordered = ids.sort(-1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    if bool(dup.any()):
        raise ValueError(f"teacher_ids repeat an id within a token (first in valid token {int(dup.nonzero()[0])}); "
                         f"each token's k ids must be distinct")
    log_p = log_p.double()
    bad = torch.isnan(log_p) | (log_p == math.inf)
    if bool(bad.any()):
        raise ValueError(f"teacher_logprobs hold NaN or +inf (first in valid token {int(bad.any(-1).nonzero()[0])}); "
                         f"−inf (probability 0) is allowed")
    mass = log_p.exp().sum(-1)
    if bool((mass > 1 + MASS_SLACK).any()):
        raise ValueError(f"teacher probabilities sum to {float(mass.max()):.4g} > 1 in a token: teacher_logprobs must "
                         f"be log-probabilities under the teacher's full softmax (not logits)")


def padded_ids(teacher_ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """teacher_ids with ignored tokens' ids (padding, any value) replaced by 0..k−1, so every row can be gathered."""
    if valid is None:
        return teacher_ids
    fill = torch.arange(teacher_ids.shape[-1], device=teacher_ids.device, dtype=teacher_ids.dtype)
    return torch.where(valid.unsqueeze(-1), teacher_ids, fill)


def sparse_divergence_fwd_bwd(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                              labels: torch.Tensor | None = None, *, kind: str = "fkl", tail: str = "bucket",
                              beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                              ignore_index: int = -100, soft_scale: float | torch.Tensor = 1.0,
                              hard_scale: float | torch.Tensor | None = None, want_student_grad: bool = True,
                              student_grad_out: torch.Tensor | None = None, backend: str = "auto") -> DivergenceOut:
    """Loss and closed-form student gradient of one [n, V] block against a sparse teacher, in one fused pass.

    student [n, V] fp32/bf16/fp16 (fp64 on torch), unit column stride; teacher_ids [n, k] int (distinct, < V in
    every row: check_sparse_teacher, padded_ids), teacher_logprobs [n, k] float (log p at temperature T). Otherwise as
    kdfast.ops.divergence.divergence_fwd_bwd (labels, ignore_index, soft/hard scales, in-place gradient).
    """
    n, V = student.shape
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[0] != n:
        raise ValueError(f"sparse teacher {tuple(teacher_ids.shape)} does not cover the {n} student rows")
    backend = fused_pass_backend("sparse_divergence_fwd_bwd", (student,), labels, hard_scale, backend)
    check_tail(kind, tail)
    kind = effective_kind(kind, beta, alpha)
    gs = None
    if want_student_grad:
        gs = torch.empty_like(student) if student_grad_out is None else student_grad_out
    scales = pass_scales(soft_scale, hard_scale, student.dtype == torch.float64, student.device)
    run = _triton_pass if backend == "triton" else _torch_pass
    return run(student, teacher_ids, teacher_logprobs, labels, gs, scales, kind=kind, tail=tail,
               mix=mixture(kind, beta, alpha), temperature=temperature, ignore_index=ignore_index,
               hard=hard_scale is not None)


def check_tail(kind: str, tail: str) -> None:
    check_choice("tail", tail, TAILS)
    if tail == "renorm" and kind != "fkl":
        raise ValueError(f"tail='renorm' is defined for kind='fkl' only (got {kind!r}): the renormalized teacher "
                         f"has probability 0 outside its top-k ids, where the student's q is positive, and every "
                         f"other kind scores q there (rkl would be infinite); use tail='bucket'")


def _triton_pass(student, ids, log_p, labels, gs, scales, *, kind, tail, mix, temperature, ignore_index, hard):
    from kdfast.kernels import sparse_divergence as kernels

    check_float("student logits", student)
    n = student.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    hard_loss = torch.empty_like(loss) if hard else None
    bad = torch.empty(n, dtype=torch.int32, device=student.device)
    kernels.launch(student, ids.to(torch.int32).contiguous(), log_p.float().contiguous(), gs, loss, hard_loss, bad,
                   None if labels is None else labels.contiguous(), scales, kind=kind, tail=tail,
                   ignore_index=ignore_index, temperature=temperature, mix=mix)
    return DivergenceOut(loss, hard_loss, gs, None, bad)


def _torch_pass(student, ids, log_p, labels, gs, scales, *, kind, tail, mix, temperature, ignore_index, hard):
    cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32

    def chunk(sl: slice):
        return _torch_chunk(student[sl], ids[sl].long(), log_p[sl], kind, tail, mix, 1.0 / temperature, cdtype,
                            want=gs is not None)

    return torch_rows(student, labels, gs, None, scales, chunk, cdtype=cdtype, chunk_elements=TORCH_CHUNK_ELEMENTS,
                      temperature=temperature, ignore_index=ignore_index, hard=hard)


def _torch_chunk(s, ids, log_p, kind, tail, mix, inv_temp, cdtype, *, want):
    """One chunk: per-row loss [r], ∂loss/∂x [r, V] (x = s/T, unscaled; None unless wanted), no teacher
    gradient (None), q and bad flags."""
    x = scaled_logits(s, inv_temp, cdtype)
    bad = nonfinite_flags(x.amax(-1)) * BAD_STUDENT
    lse = _finite_or_zero(torch.logsumexp(x, -1, keepdim=True))
    log_q = x.gather(1, ids) - lse
    log_p = log_p.to(cdtype)
    rest = None
    if tail == "bucket":
        rest = x.scatter(1, ids, -math.inf)  # the student's logits outside S, exact (no 1 − Σq cancellation)
        lse_rest = _finite_or_zero(torch.logsumexp(rest, -1, keepdim=True))
        log_q_rest = torch.where(rest.amax(-1, keepdim=True) == -math.inf, -math.inf, lse_rest - lse)
        log_p_rest = (1 - log_p.exp().sum(-1, keepdim=True)).clamp_min(0).log()
        log_q, log_p = torch.cat([log_q, log_q_rest], 1), torch.cat([log_p, log_p_rest], 1)
    else:
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
    # An outcome with probability 0 under either model contributes 0, as a −inf logit does in the dense op.
    dead = (log_q == -math.inf) | (log_p == -math.inf) | torch.isnan(log_q)
    log_q, log_p = log_q.masked_fill(dead, 0.0), log_p.masked_fill(dead, 0.0)
    q_live, p_live = log_q.exp().masked_fill_(dead, 0.0), log_p.exp().masked_fill_(dead, 0.0)
    f, g, h = torch_terms(kind, log_q, log_p, q_live, p_live, mix)
    g.masked_fill_(dead, 0.0)
    loss = h.masked_fill_(dead, 0.0).add_(g).sum(-1) if f is None else f
    q = (x - lse).exp_()
    if not want:
        return loss, None, None, q, bad
    k = ids.shape[1]
    # ∂f/∂x_v = g_v·[v∈S] + g_rest·q_v/q_rest·[v∉S] − q_v·Σg  (log q_rest = logsumexp_{v∉S} x_v − lse)
    grad = q * -g.sum(-1, keepdim=True)
    if rest is not None:
        grad.add_((rest - lse_rest).exp_().mul_(g[:, k:]))
    return loss, grad.scatter_add_(1, ids, g[:, :k]), None, q, bad


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """A row's log-normalizer, 0 where the row has no finite entry (so that −inf − lse stays −inf, not NaN)."""
    return torch.where(torch.isfinite(x), x, 0.0)


@dataclasses.dataclass(frozen=True)
class _SparseDivergenceArgs:
    """The non-tensor arguments of one sparse_distill_loss call."""

    kind: str
    tail: str
    beta: float
    alpha: float
    temperature: float
    ignore_index: int
    reduction: str
    backend: str
    inplace_grad: bool
    scale_by_t2: bool
    grad_enabled: bool  # grad mode at the call: ctx.needs_input_grad ignores torch.no_grad()


class SparseDistillLossFunction(torch.autograd.Function):
    """Loss and student gradient computed together in the forward; the backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor, labels: torch.Tensor | None,
                spec: _SparseDivergenceArgs) -> torch.Tensor:
        lead = student.shape[:-1]
        s2 = as_rows(student.detach())
        k = ids.shape[-1]
        flat_labels = None if labels is None else labels.reshape(-1)
        want = spec.grad_enabled and ctx.needs_input_grad[0]
        gs = (s2 if spec.inplace_grad else torch.empty_like(s2)) if want else None
        loss = reduced_loss(spec, flat_labels, lead, lambda scale: sparse_divergence_fwd_bwd(
            s2, ids.reshape(-1, k), log_p.detach().reshape(-1, k), flat_labels, kind=spec.kind, tail=spec.tail,
            beta=spec.beta, alpha=spec.alpha, temperature=spec.temperature, ignore_index=spec.ignore_index,
            soft_scale=scale, want_student_grad=want, student_grad_out=gs, backend=spec.backend))
        ctx.save_for_backward(gs)
        ctx.shape = student.shape
        ctx.in_place = spec.inplace_grad
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (gs,) = ctx.saved_tensors
        go = grad_output.reshape(-1) if grad_output.dim() else grad_output
        grad = None if gs is None else times_grad_output(gs, go, ctx.in_place).view(ctx.shape)
        return grad, None, None, None, None


def sparse_distill_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                        kind: str = "fkl", *, tail: str = "bucket", labels: torch.Tensor | None = None,
                        temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1, ignore_index: int = -100,
                        reduction: str = "mean", backend: str = "auto", inplace_grad: bool = False,
                        scale_by_t2: bool = False) -> torch.Tensor:
    """Distillation divergence between a sparse teacher (top-k ids and log-probs) and the student's softmax(s/T).

    student_logits [N, V] / [B, T, V] fp32, bf16 or fp16 (fp64 on torch/reference); teacher_ids [N, k] / [B, T, k]
    int (int32 as cached; distinct within a token, < V); teacher_logprobs [.., k] fp16/bf16/fp32: log p of those ids
    under the teacher's full softmax at `temperature` (the cache stores them so; the student is divided by T here).
    tail: 'bucket' (every kind, on the k+1 outcomes S ∪ {rest} with p_rest = 1 − Σ_S p, q_rest = 1 − Σ_S q; equals
    kdfast.distill_loss when S is the whole vocabulary) or 'renorm' (fkl only: teacher renormalized over S).
    labels, ignore_index, reduction, backend, inplace_grad, scale_by_t2, beta, alpha: as kdfast.distill_loss.
    Returns fp32 (fp64 for fp64 logits). Raises ValueError on bad arguments, on duplicate or out-of-range ids, on
    NaN/+inf log-probs and on NaN/+inf student logits in a valid token.
    """
    check_loss_args(kind, reduction, REDUCTIONS, beta, alpha, temperature)
    check_tail(kind, tail)
    if student_logits.dim() < 2:
        raise ValueError(f"student logits {tuple(student_logits.shape)} must be [N, V] or [B, T, V]")
    lead = student_logits.shape[:-1]
    check_labels(labels, lead)
    check_same_device(student_logits=student_logits, teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs,
                      labels=labels)
    valid = None if labels is None else labels != ignore_index
    check_sparse_teacher(teacher_ids, teacher_logprobs, lead, student_logits.shape[-1], valid)
    teacher_ids = padded_ids(teacher_ids, valid)
    backend = resolve_backend(backend, student_logits.device)
    if backend == "reference":
        return reference.sparse_distill_loss(student_logits, teacher_ids, teacher_logprobs.detach(), kind, tail, beta,
                                             alpha, temperature, labels, ignore_index, reduction, scale_by_t2)
    allowed = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if backend == "torch" else ())
    check_float("student logits", student_logits, allowed)
    spec = _SparseDivergenceArgs(kind, tail, beta, alpha, temperature, ignore_index, reduction, backend, inplace_grad,
                                 scale_by_t2, torch.is_grad_enabled())
    return SparseDistillLossFunction.apply(student_logits, teacher_ids, teacher_logprobs, labels, spec)
