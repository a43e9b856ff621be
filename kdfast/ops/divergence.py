"""Divergence losses on logits (docs/design.md §3): the custom op kdfast::distill_loss (fake and backward registered, so
torch.compile traces it whole), dispatching to Triton, chunked torch or the reference."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from kdfast import reference
from kdfast.ops._checks import (
    check_choice,
    check_float,
    check_label_values,
    check_labels,
    check_same_device,
    check_temperature,
    check_unit_interval,
    common_vocab,
    raise_if_nonfinite,
)
from kdfast.runtime import DIVERGENCE_CHUNK_ELEMENTS, triton_interpreting

KINDS = reference.KINDS
REDUCTIONS = reference.REDUCTIONS
BACKENDS = ("auto", "triton", "torch", "reference")
BAD_STUDENT, BAD_TEACHER = 1, 2


class DivergenceOut(NamedTuple):
    """What one fused pass over [n, V] logits returns."""

    loss: torch.Tensor  # [n] fp32: the per-token divergence (0 at ignored tokens), unscaled
    hard_loss: torch.Tensor | None  # [n] fp32: per-token cross-entropy on the labels, when asked for
    grad_student: torch.Tensor | None  # [n, V] student dtype: soft·∂div/∂s + hard·∂CE/∂s
    grad_teacher: torch.Tensor | None  # [n, V] teacher dtype: soft·∂div/∂t
    bad: torch.Tensor  # [n] int32: BAD_STUDENT | BAD_TEACHER where a valid row holds NaN or +inf


def effective_kind(kind: str, beta: float, alpha: float) -> str:
    """Resolve the endpoints: jsd β=0 is fkl and β=1 is rkl; skl/srkl α=0 are fkl/rkl, α=1 vanish ('zero')."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "fkl" if beta == 0.0 else "rkl"
    if kind in ("skl", "srkl") and alpha in (0.0, 1.0):
        return "zero" if alpha == 1.0 else {"skl": "fkl", "srkl": "rkl"}[kind]
    return kind


def mixture(kind: str, beta: float, alpha: float) -> tuple[float, float, float, float]:
    """(wp, wq, log wp, log wq) of the mixture m = wp·p + wq·q each mixing kind uses (unused otherwise)."""
    wp = {"jsd": beta, "skl": alpha, "srkl": 1.0 - alpha}.get(kind, 0.5)
    wq = 1.0 - wp
    return wp, wq, math.log(wp), math.log(wq)


def check_loss_args(kind: str, reduction: str, reductions: Sequence[str], beta: float, alpha: float,
                    temperature: float) -> None:
    """The checks every divergence loss starts with, in one order (and so with one first complaint)."""
    check_choice("divergence kind", kind, KINDS)
    check_choice("reduction", reduction, reductions)
    check_unit_interval("beta", beta)
    check_unit_interval("alpha", alpha)
    check_temperature(temperature)


def resolve_backend(backend: str, device: torch.device) -> str:
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _have_triton() else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                         "use backend='torch' on the CPU")
    return backend


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def divergence_fwd_bwd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
                       kind: str = "fkl", beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                       ignore_index: int = -100, soft_scale: float | torch.Tensor = 1.0,
                       hard_scale: float | torch.Tensor | None = None, want_student_grad: bool = True,
                       want_teacher_grad: bool = False, student_grad_out: torch.Tensor | None = None,
                       teacher_grad_out: torch.Tensor | None = None, backend: str = "auto") -> DivergenceOut:
    """Loss and closed-form gradients of one [n, V] block of logits in one fused pass (the building block).

    student, teacher: [n, V] fp32/bf16/fp16 (fp64 on the torch backend), unit column stride, equal V.
    labels: [n] int or None; rows equal to ignore_index give loss 0 and zero gradients (their logits are not read
    by the Triton kernel). hard_scale (not None) adds hard_scale·∂CE(labels)/∂s to the student gradient and
    returns the per-token CE (at temperature 1). Gradients are scaled by soft_scale (and 1/T via the chain rule)
    and stored in the input dtype; pass student_grad_out=student to overwrite the student logits in place.
    Nothing is raised for non-finite rows: the caller checks `bad` (kdfast.ops._checks.raise_if_nonfinite).
    """
    n, V = student.shape
    if teacher.shape != (n, V):
        raise ValueError(f"student block {tuple(student.shape)} and teacher block {tuple(teacher.shape)} differ")
    backend = fused_pass_backend("divergence_fwd_bwd", (student, teacher), labels, hard_scale, backend)
    kind = effective_kind(kind, beta, alpha)
    gs = _grad_buffer(student, want_student_grad, student_grad_out)
    gt = _grad_buffer(teacher, want_teacher_grad, teacher_grad_out)
    scales = pass_scales(soft_scale, hard_scale, torch.float64 in (student.dtype, teacher.dtype), student.device)
    run = _triton_pass if backend == "triton" else _torch_pass
    return run(student, teacher, labels, gs, gt, scales, kind=kind, mix=mixture(kind, beta, alpha),
               temperature=temperature, ignore_index=ignore_index, hard=hard_scale is not None)


def fused_pass_backend(name: str, blocks: tuple[torch.Tensor, ...], labels: torch.Tensor | None,
                       hard_scale: float | torch.Tensor | None, backend: str) -> str:
    """The checks of a one-block fused pass (dense or sparse teacher); returns its backend, 'triton' or 'torch'."""
    if any(x.stride(-1) != 1 for x in blocks):
        raise ValueError(f"{name} needs logits with unit column stride")
    if hard_scale is not None and labels is None:
        raise ValueError("a hard (cross-entropy) term needs labels")
    backend = resolve_backend(backend, blocks[0].device)
    if backend == "reference":
        raise ValueError(f"{name} runs the 'triton' or 'torch' backend; the reference has no fused pass")
    return backend


def pass_scales(soft_scale: float | torch.Tensor, hard_scale: float | torch.Tensor | None, wide: bool,
                device: torch.device) -> torch.Tensor:
    """(soft, hard) gradient weights as one device tensor: a tensor scale (the mean's 1/count) needs no host sync."""
    scales = torch.zeros(2, dtype=torch.float64 if wide else torch.float32, device=device)
    scales[0] = soft_scale
    scales[1] = 0.0 if hard_scale is None else hard_scale
    return scales


def _grad_buffer(x: torch.Tensor, want: bool, out: torch.Tensor | None) -> torch.Tensor | None:
    if not want:
        return None
    if out is None:
        return torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"gradient buffer {tuple(out.shape)} {out.dtype} does not match {tuple(x.shape)} {x.dtype}")
    return out


def _triton_pass(student, teacher, labels, gs, gt, scales, *, kind, mix, temperature, ignore_index, hard):
    from kdfast.kernels import divergence as kernels

    check_float("student logits", student)
    check_float("teacher logits", teacher)
    n = student.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    hard_loss = torch.empty_like(loss) if hard else None
    bad = torch.empty(n, dtype=torch.int32, device=student.device)
    labels = None if labels is None else labels.contiguous()
    kernels.launch(student, teacher, gs, gt, loss, hard_loss, bad, labels, scales, kind=kind,
                   ignore_index=ignore_index, temperature=temperature, mix=mix,
                   raw_stats=hard and temperature != 1.0)
    return DivergenceOut(loss, hard_loss, gs, gt, bad)


def _torch_pass(student, teacher, labels, gs, gt, scales, *, kind, mix, temperature, ignore_index, hard):
    cdtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32

    def chunk(sl: slice):
        return _torch_chunk(student[sl], teacher[sl], kind, mix, 1.0 / temperature, cdtype, want_s=gs is not None,
                            want_t=gt is not None)

    return torch_rows(student, labels, gs, gt, scales, chunk, cdtype=cdtype, chunk_elements=DIVERGENCE_CHUNK_ELEMENTS,
                      temperature=temperature, ignore_index=ignore_index, hard=hard)


def torch_rows(student, labels, gs, gt, scales, chunk, *, cdtype, chunk_elements, temperature, ignore_index,
               hard) -> DivergenceOut:
    """The torch pass of a block, row chunk by row chunk: chunk(sl) gives (loss, g, h, q, bad) of rows sl, with
    the unscaled gradients g = ∂loss/∂(s/T) and h (teacher, or None); here ignored rows are zeroed, the hard term
    added and the gradients scaled into gs / gt. Shared by the dense and the sparse teacher."""
    n, V = student.shape
    loss = torch.zeros(n, dtype=cdtype, device=student.device)
    hard_loss = torch.zeros_like(loss) if hard else None
    bad = torch.zeros(n, dtype=torch.int32, device=student.device)
    valid = None if labels is None else labels != ignore_index
    soft_x = scales[0].to(cdtype) / temperature
    rows = max(1, chunk_elements // V)
    for i in range(0, n, rows):
        sl = slice(i, min(i + rows, n))
        keep = None if valid is None else valid[sl]
        f, g, h, q, bad_rows = chunk(sl)
        loss[sl] = f if keep is None else f.where(keep, 0.0)
        bad[sl] = bad_rows if keep is None else bad_rows.where(keep, 0)
        if hard:
            g = _add_hard(g, q, student[sl].to(cdtype), labels[sl], keep, hard_loss, sl, soft_x,
                          scales[1].to(cdtype), temperature, want=gs is not None)
        elif gs is not None:
            g = g.mul_(soft_x)
        if gs is not None:
            gs[sl] = _masked(g, keep)
        if gt is not None:
            gt[sl] = _masked(h.mul_(soft_x), keep)
    return DivergenceOut(loss, hard_loss, gs, gt, bad)


def _add_hard(g, q, s_raw, labels, keep, hard_loss, sl, soft_x, hard_x, temperature, *, want):
    """Write the per-token CE (temperature 1) into hard_loss[sl]; return soft_x·g + hard_x·(softmax(s) − onehot)."""
    target = labels.where(keep, 0).unsqueeze(-1)
    log_q_raw = torch.log_softmax(s_raw, -1)
    hard_loss[sl] = log_q_raw.gather(-1, target).squeeze(-1).neg_().where(keep, 0.0)
    if not want:
        return g
    q_raw = q if temperature == 1.0 else log_q_raw.exp_()
    g = g.mul_(soft_x).add_(q_raw * hard_x)
    return g.scatter_add_(-1, target, (-hard_x).expand_as(target).to(g.dtype))


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x.masked_fill_(~keep.unsqueeze(-1), 0.0)


def _torch_chunk(s, t, kind, mix, inv_temp, cdtype, *, want_s, want_t):
    """One chunk in torch: per-row loss [r], the logit gradients g, h [r, V] (unscaled), q and bad-row flags."""
    x = scaled_logits(s, inv_temp, cdtype)
    y = scaled_logits(t, inv_temp, cdtype)
    # NaN/+inf show in the row max, −inf entries in the chunk min: cheap reductions, no elementwise pass.
    bad = nonfinite_flags(x.amax(-1)) * BAD_STUDENT + nonfinite_flags(y.amax(-1)) * BAD_TEACHER
    log_q, log_p = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    q, p = log_q.exp(), log_p.exp()
    dead = None
    if bool((x.amin() == -math.inf) | (y.amin() == -math.inf)):
        s_dead, t_dead = x == -math.inf, y == -math.inf
        q.masked_fill_(s_dead, 0.0)  # also clears the NaN of a row with no finite entry
        p.masked_fill_(t_dead, 0.0)
        dead = s_dead | t_dead
        log_q.masked_fill_(dead, 0.0)
        log_p.masked_fill_(dead, 0.0)
    q_live = q if dead is None else q.masked_fill(dead, 0.0)
    p_live = p if dead is None else p.masked_fill(dead, 0.0)
    f, g, h = torch_terms(kind, log_q, log_p, q_live, p_live, mix)
    if dead is not None:
        g.masked_fill_(dead, 0.0)
        h.masked_fill_(dead, 0.0)
    g_sum = g.sum(-1, keepdim=True) if want_s or f is None else None
    h_sum = h.sum(-1, keepdim=True) if want_t or f is None else None
    loss = (g_sum + h_sum).squeeze(-1) if f is None else f
    # Softmax backward: ∂f/∂x_j = g_j − q_j·Σg (and likewise for the teacher).
    if want_s:
        g = g.addcmul_(q, g_sum, value=-1.0)
    if want_t:
        h = h.addcmul_(p, h_sum, value=-1.0)
    return loss, g, h, q, bad


def scaled_logits(x: torch.Tensor, inv_temp: float, cdtype: torch.dtype) -> torch.Tensor:
    x = x.to(cdtype)
    return x if inv_temp == 1.0 else x * inv_temp


def nonfinite_flags(row_max: torch.Tensor) -> torch.Tensor:
    return (torch.isnan(row_max) | (row_max == math.inf)).to(torch.int32)


def torch_terms(kind, log_q, log_p, q_live, p_live, mix):
    """Row loss Σf (None for jsd, where f = g + h), and per entry g = ∂f/∂log q, h = ∂f/∂log p.

    The torch twin of kernels.divergence._terms. In-place ops on fresh temporaries only: on the CPU each pass
    over the chunk costs memory traffic.
    """
    wp, wq, log_wp, log_wq = mix
    if kind == "fkl":
        f = (log_p - log_q).mul_(p_live)
        return f.sum(-1), -p_live, f.add_(p_live)
    if kind == "rkl":
        f = (log_q - log_p).mul_(q_live)
        return f.sum(-1), f.add_(q_live), -q_live
    if kind == "tvd":
        d = p_live - q_live
        loss = d.abs().sum(-1).mul_(0.5)
        half_sign = d.sign_().mul_(0.5)  # no gradient where p == q
        return loss, torch.mul(half_sign, q_live).neg_(), half_sign.mul_(p_live)
    if kind == "zero":
        return torch.zeros_like(log_q[:, 0]), torch.zeros_like(log_q), torch.zeros_like(log_q)
    log_m = torch.logaddexp(log_p + log_wp, log_q + log_wq)
    if kind == "jsd":
        return None, (log_q - log_m).mul_(q_live).mul_(wq), (log_p - log_m).mul_(p_live).mul_(wp)
    cross = (log_p + log_q).sub_(log_m).exp_()
    if kind == "skl":
        f = (log_p - log_m).mul_(p_live)
        loss = f.sum(-1)
        return loss, cross.mul_(-wq), f.add_(p_live).sub_((2 * log_p).sub_(log_m).exp_().mul_(wp))
    f = (log_q - log_m).mul_(q_live)  # srkl
    loss = f.sum(-1)
    return loss, f.add_(q_live).sub_((2 * log_q).sub_(log_m).exp_().mul_(wq)), cross.mul_(-wp)


@dataclasses.dataclass(frozen=True)
class _DivergenceArgs:
    """The non-tensor arguments of one distill_loss call."""

    kind: str
    beta: float
    alpha: float
    temperature: float
    ignore_index: int
    reduction: str
    backend: str
    vocab: int
    scale_by_t2: bool


def _loss_and_grads(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                    spec: _DivergenceArgs,
                    gs: torch.Tensor | None, gt: torch.Tensor | None) -> torch.Tensor:
    """The loss of a distill_loss call; its gradient d(loss)/d(logits) goes into gs / gt (shaped like the inputs,
    or None when not wanted). Raises on non-finite logits and on labels outside the vocabulary."""
    check_label_values(labels, spec.vocab, spec.ignore_index)
    lead = student.shape[:-1]
    s2, t2 = as_rows(student), as_rows(teacher)
    gs2 = None if gs is None else gs.view(s2.shape)
    gt2 = None if gt is None else gt.view(t2.shape)
    flat_labels = None if labels is None else labels.reshape(-1)
    V = spec.vocab
    loss = reduced_loss(spec, flat_labels, lead, lambda scale: divergence_fwd_bwd(
        s2[:, :V], t2[:, :V], flat_labels, kind=spec.kind, beta=spec.beta, alpha=spec.alpha,
        temperature=spec.temperature, ignore_index=spec.ignore_index, soft_scale=scale,
        want_student_grad=gs2 is not None, want_teacher_grad=gt2 is not None, backend=spec.backend,
        student_grad_out=None if gs2 is None else gs2[:, :V], teacher_grad_out=None if gt2 is None else gt2[:, :V]))
    for grad in (gs2, gt2):
        if grad is not None and grad.shape[1] > V:
            grad[:, V:].zero_()  # entries outside the common vocabulary take no part in the loss
    return loss


def reduced_loss(spec, labels: torch.Tensor | None, lead: torch.Size,
                 run: Callable[[float | torch.Tensor], DivergenceOut]) -> torch.Tensor:
    """The reduced loss of a whole call: run(soft_scale) makes its fused pass over the flattened rows (the
    gradients it writes are those of the reduced loss); raises on non-finite logits. spec: the op's arguments
    (temperature, scale_by_t2, ignore_index, reduction)."""
    t2_factor = spec.temperature**2 if spec.scale_by_t2 else 1.0
    scale = t2_factor * (mean_scale(labels, lead.numel(), spec.ignore_index) if spec.reduction == "mean" else 1.0)
    out = run(scale)
    raise_if_nonfinite(out.bad, BAD_STUDENT, BAD_TEACHER)
    if spec.reduction == "none":
        return (out.loss * t2_factor).reshape(lead)
    return (out.loss.sum() * scale).to(out.loss.dtype)


@torch.library.custom_op("kdfast::distill_loss", mutates_args=())
def _distill_loss_op(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, kind: str,
                     beta: float, alpha: float, temperature: float, ignore_index: int, reduction: str, backend: str,
                     vocab: int, scale_by_t2: bool, want_student_grad: bool,
                     want_teacher_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss/d student, d loss/d teacher): an unwanted gradient comes back as an empty [0] tensor.

    One opaque op to torch.compile: its host syncs (the non-finite check, the kernel launch) stay inside.
    """
    spec = _DivergenceArgs(kind, beta, alpha, temperature, ignore_index, reduction, backend, vocab, scale_by_t2)
    gs, gt = (_grad_out(x, want) for x, want in ((student, want_student_grad), (teacher, want_teacher_grad)))
    loss = _loss_and_grads(student, teacher, labels, spec, gs if want_student_grad else None,
                           gt if want_teacher_grad else None)
    return loss, gs, gt


@_distill_loss_op.register_fake
def _(student, teacher, labels, kind, beta, alpha, temperature, ignore_index, reduction, backend, vocab,
      scale_by_t2, want_student_grad, want_teacher_grad):
    wide = torch.float64 in (student.dtype, teacher.dtype)
    shape = student.shape[:-1] if reduction == "none" else ()
    loss = student.new_empty(shape, dtype=torch.float64 if wide else torch.float32)
    return loss, _grad_out(student, want_student_grad), _grad_out(teacher, want_teacher_grad)


def _grad_out(x: torch.Tensor, want: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device) if want else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    _, gs, gt = output
    ctx.mark_non_differentiable(gs, gt)
    ctx.set_materialize_grads(False)  # else autograd hands backward zeros shaped like the stored gradients
    ctx.save_for_backward(gs, gt)
    ctx.want = inputs[-2:]


def _backward(ctx, grad_loss, _grad_gs, _grad_gt):
    gs, gt = ctx.saved_tensors
    # The stored gradients belong to this node alone: scaled in place (eager), no [N, V] copy; a second backward
    # through the node fails autograd's version check.
    inplace = not torch.compiler.is_compiling()
    grads = [times_grad_output(g, grad_loss, inplace) if want else None for g, want in zip((gs, gt), ctx.want)]
    return grads[0], grads[1], *([None] * 12)


_distill_loss_op.register_autograd(_backward, setup_context=_setup_context)


class DistillLossFunction(torch.autograd.Function):
    """inplace_grad=True: the student gradient overwrites the student logits, which a custom op (whose outputs
    never alias its inputs) cannot do; torch.compile traces distill_loss through the op instead."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, spec: _DivergenceArgs,
                want_student_grad: bool, want_teacher_grad: bool) -> torch.Tensor:
        # Detached: the gradient buffers alias the inputs and are written without autograd tracking.
        s, t = student.detach(), teacher.detach()
        gs = as_rows(s).view(s.shape) if want_student_grad else None
        gt = torch.empty_like(t) if want_teacher_grad else None
        loss = _loss_and_grads(s, t, labels, spec, gs, gt)
        ctx.save_for_backward(gs, gt)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gs, gt = ctx.saved_tensors
        grads = times_grad_output(gs, grad_output, True), times_grad_output(gt, grad_output, False)
        return *grads, None, None, None, None


def mean_scale(labels: torch.Tensor | None, n: int, ignore_index: int) -> float | torch.Tensor:
    """1 / (valid tokens of the whole call), at least 1; a device tensor when labels decide (no host sync)."""
    if labels is None:
        return 1.0 / max(n, 1)
    return 1.0 / (labels != ignore_index).sum().clamp_min(1).double()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit column stride (a view whenever the layout allows, so in-place writes land)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def times_grad_output(grad: torch.Tensor | None, grad_output: torch.Tensor, inplace: bool) -> torch.Tensor | None:
    """grad [..., V] · grad_output ([...] or 0-dim); skipped in eager mode when grad_output is 1 (the usual case),
    in place when the buffer was given up."""
    if grad is None:
        return None
    if not torch.compiler.is_compiling() and bool((grad_output == 1).all()):
        return grad
    go = (grad_output.unsqueeze(-1) if grad_output.dim() else grad_output).to(grad.dtype)
    return grad.mul_(go) if inplace else grad * go


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl", *,
                 beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                 labels: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 vocab: str = "error", backend: str = "auto", teacher_grad: bool = False,
                 inplace_grad: bool = False, scale_by_t2: bool = False) -> torch.Tensor:
    """Distillation divergence between teacher p = softmax(t/T) and student q = softmax(s/T) (docs/design.md §3).

    student_logits [N, V] or [B, T, V], teacher_logits [N, V'] / [B, T, V'] (fp32, bf16 or fp16; the torch and
    reference backends also take fp64); labels [N] / [B, T] int, positions equal to ignore_index are masked.
    kind: fkl | rkl | jsd (β; 0 → fkl, 1 → rkl) | skl | srkl (α) | tvd. reduction: mean over valid tokens,
    sum, or none ([N] / [B, T], 0 at ignored tokens). Returns fp32 (fp64 for fp64 inputs).
    vocab: 'error' raises when V != V'; 'intersect' compares the first min(V, V') entries.
    backend: triton (CUDA, or CPU under TRITON_INTERPRET=1), torch (token-chunked, any device), reference,
    auto (triton on CUDA, torch elsewhere). The gradient is computed in the forward, in the input dtype;
    teacher_grad=True also returns one for the teacher; inplace_grad=True writes the student gradient into the
    student logits' own buffer (the caller gives them up; eager only, torch.compile needs it off). scale_by_t2
    multiplies by T² (Hinton).
    Raises ValueError on bad arguments and on NaN/+inf logits in a valid row (naming the first such row).
    """
    check_loss_args(kind, reduction, REDUCTIONS, beta, alpha, temperature)
    if student_logits.dim() < 2 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must be [N, V] or [B, T, V] with equal leading dims")
    check_labels(labels, student_logits.shape[:-1])
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    V = common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab)
    backend = resolve_backend(backend, student_logits.device)
    if backend == "reference":
        check_label_values(labels, V, ignore_index)
        teacher = teacher_logits if teacher_grad else teacher_logits.detach()
        return reference.distill_loss(student_logits[..., :V], teacher[..., :V], kind, beta, alpha, temperature,
                                      labels, ignore_index, reduction, scale_by_t2)
    allowed = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if backend == "torch" else ())
    check_float("student logits", student_logits, allowed)
    check_float("teacher logits", teacher_logits, allowed)
    spec = _DivergenceArgs(kind, beta, alpha, temperature, ignore_index, reduction, backend, V, scale_by_t2)
    grad_mode = torch.is_grad_enabled()
    want_s = grad_mode and student_logits.requires_grad
    want_t = grad_mode and teacher_grad and teacher_logits.requires_grad
    if inplace_grad:
        return DistillLossFunction.apply(student_logits, teacher_logits, labels, spec, want_s, want_t)
    loss, _, _ = _distill_loss_op(student_logits, teacher_logits, labels, kind, beta, alpha, temperature,
                                  ignore_index, reduction, backend, V, scale_by_t2, want_s, want_t)
    return loss
