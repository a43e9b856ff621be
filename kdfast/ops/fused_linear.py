"""Fused-linear distillation: hidden states + LM heads in, loss and gradients out, one token chunk at a time."""
from __future__ import annotations

import dataclasses

import torch

from kdfast.ops._checks import check_float, check_labels, check_same_device, common_vocab
from kdfast.ops._chunks import (
    REDUCTIONS,
    check_args,
    check_targets,
    chunk_rows,
    chunked_loss,
    loss_dtype,
    pick_chunk_size,
    scaled_saved,
)
from kdfast.ops.divergence import divergence_fwd_bwd, mean_scale, times_grad_output

# Re-exported: kdfast.losses and the benchmarks name them here.
__all__ = ["REDUCTIONS", "fused_linear_distill_loss", "pick_chunk_size"]


@dataclasses.dataclass(frozen=True)
class _FusedLinearArgs:
    """The non-tensor arguments of one fused_linear_distill_loss call."""

    kind: str
    beta: float
    alpha: float
    temperature: float
    ignore_index: int
    hard_weight: float
    soft_weight: float
    reduction: str
    vocab: int
    chunk_size: int
    accum_dtype: torch.dtype
    scale_by_t2: bool
    backend: str
    grad_enabled: bool  # grad mode at the call: ctx.needs_input_grad ignores torch.no_grad()


class FusedLinearDistillFunction(torch.autograd.Function):
    """Forward computes the loss and every gradient chunk by chunk; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None, ht: torch.Tensor,
                wt: torch.Tensor, bt: torch.Tensor | None, labels: torch.Tensor | None,
                spec: _FusedLinearArgs) -> torch.Tensor:
        hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
        lab = None if labels is None else labels.reshape(-1)
        n, V = hs2.shape[0], spec.vocab
        scale = mean_scale(lab, n, spec.ignore_index) if spec.reduction == "mean" else 1.0
        kept = _kept_tokens(lab, spec.ignore_index)
        if kept is not None:  # ignored tokens add nothing: no logits for them
            hs2, ht2, lab = hs2[kept], ht2[kept], lab[kept]
        return chunked_loss(ctx, spec, (hs, ws, bs), hs2, lab, kept, V, scale, _dense_pass,
                            teacher=(ht2, wt[:V], None if bt is None else bt[:V]))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return *scaled_saved(ctx, grad_output), None, None, None, None, None


def _dense_pass(sl, logits, teacher_logits, labels, **pass_args):
    return divergence_fwd_bwd(logits, teacher_logits, labels, **pass_args)


def _kept_tokens(labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor | None:
    """Indices of the tokens whose label is not ignore_index; None when every token counts (one host sync)."""
    if labels is None:
        return None
    keep = labels != ignore_index
    return None if bool(keep.all()) else keep.nonzero().flatten()


def fused_linear_distill_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *, kind: str = "fkl", beta: float = 0.5,
    alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100, hard_weight: float = 0.0,
    soft_weight: float = 1.0, student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    vocab: str = "error", chunk_size: int | None = None, reduction: str = "mean",
    accum_dtype: torch.dtype | None = None, scale_by_t2: bool = False, backend: str = "auto",
) -> torch.Tensor:
    """hard_weight·CE(labels) + soft_weight·divergence(teacher ‖ student) from hidden states, logits never whole.

    student_hidden [N, Hs] or [B, T, Hs] and student_weight [V, Hs] (an lm_head / tied embedding weight), optional
    student_bias [V]; teacher_hidden [N, Ht] / [B, T, Ht], teacher_weight [V', Ht], teacher_bias [V'] (the teacher
    gets no gradient). fp32, bf16 or fp16; hidden and weight of one model share a dtype, except an fp32 student
    weight/bias with bf16/fp16 hidden states (an fp32 master under autocast): the GEMMs then run in the hidden
    states' dtype and d(weight) is accumulated and returned in fp32. labels [N] / [B, T]: tokens equal to
    ignore_index are masked (dropped before the matmuls; zero gradient), the rest are the targets of the hard
    loss (temperature 1).
    kind, beta, alpha, temperature, vocab, scale_by_t2: as kdfast.distill_loss. reduction: mean over the valid
    tokens of the whole call, or sum. chunk_size: tokens per chunk (None: from the shapes and a memory budget).
    accum_dtype: dtype of the d(weight)/d(bias) accumulators (None: fp32, fp64 for fp64 weights). Returns a 0-dim
    fp32 loss (fp64 for fp64 inputs).
    """
    backend, allowed = check_args("fused_linear_distill_loss", kind, reduction, beta, alpha, temperature, backend,
                                  student_hidden.device)
    lead = _check_shapes(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                         allowed)
    check_labels(labels, lead, what="hidden states")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                      labels=labels)
    V = common_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab)
    chunk = chunk_rows(chunk_size, student_hidden, V)
    accum = accum_dtype or loss_dtype(student_weight)
    grad_mode = torch.is_grad_enabled()
    want = [grad_mode and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    loss, *_ = _fused_linear_op(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, labels, kind, beta, alpha, temperature, ignore_index, hard_weight,
                                soft_weight, reduction, V, chunk, accum, scale_by_t2, backend, *want)
    return loss


_Out = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("kdfast::fused_linear_distill_loss", mutates_args=())
def _fused_linear_op(hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None, ht: torch.Tensor,
                     wt: torch.Tensor, bt: torch.Tensor | None, labels: torch.Tensor | None, kind: str, beta: float,
                     alpha: float, temperature: float, ignore_index: int, hard_weight: float, soft_weight: float,
                     reduction: str, vocab: int, chunk_size: int, accum_dtype: torch.dtype, scale_by_t2: bool,
                     backend: str, want_h: bool, want_w: bool, want_b: bool) -> _Out:
    """(loss, d hs, d ws, d bs), an unwanted gradient as an empty [0] tensor: FusedLinearDistillFunction run
    eagerly, as one op torch.compile does not look into (its chunk loop and checks sync with the host)."""
    check_targets(labels, ignore_index, vocab, hard_weight)
    spec = _FusedLinearArgs(kind, beta, alpha, temperature, ignore_index, hard_weight, soft_weight, reduction, vocab,
                            chunk_size, accum_dtype, scale_by_t2, backend, True)
    student = [None if x is None else x.detach().requires_grad_(w) for x, w in ((hs, want_h), (ws, want_w),
                                                                                  (bs, want_b))]
    with torch.enable_grad():
        loss = FusedLinearDistillFunction.apply(*student, ht, wt, bt, labels, spec)
    wanted = [x for x in student if x is not None and x.requires_grad]
    # The backward only hands out the gradients the forward stored (grad_output 1: no copy).
    grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    return loss.detach(), *(next(grads) if x is not None and x.requires_grad else hs.new_empty(0)
                            for x in student)


@_fused_linear_op.register_fake
def _(hs, ws, bs, ht, wt, bt, labels, kind, beta, alpha, temperature, ignore_index, hard_weight, soft_weight,
      reduction, vocab, chunk_size, accum_dtype, scale_by_t2, backend, want_h, want_w, want_b):
    grads = (x.new_empty(x.shape) if want and x is not None else hs.new_empty(0)
             for x, want in ((hs, want_h), (ws, want_w), (bs, want_b)))
    return hs.new_empty((), dtype=loss_dtype(hs)), *grads


def _fused_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd hands backward zeros shaped like every stored gradient
    ctx.save_for_backward(*output[1:])
    ctx.want = inputs[-3:]


def _fused_backward(ctx, grad_loss, *_):
    # The stored gradients belong to this node alone: scaling them in place (eager) saves a copy of d(weight)
    # [V, H] and d(hidden) [N, H]; a second backward through the node fails autograd's version check, as it should.
    inplace = not torch.compiler.is_compiling()
    grads = [times_grad_output(g, grad_loss, inplace) if want else None for g, want in zip(ctx.saved_tensors, ctx.want)]
    return *grads, *([None] * 20)


_fused_linear_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


_HALF = (torch.bfloat16, torch.float16)


def _check_shapes(hs, ws, bs, ht, wt, bt, allowed) -> torch.Size:
    """Validate the two (hidden, weight, bias) triples; return the token shape [N] or [B, T]."""
    for who, h, w, b in (("student", hs, ws, bs), ("teacher", ht, wt, bt)):
        if h.dim() < 2 or w.dim() != 2 or h.shape[-1] != w.shape[1]:
            raise ValueError(f"{who} hidden {tuple(h.shape)} and weight {tuple(w.shape)} must be [N, H] / [B, T, H] "
                             f"and [V, H] with equal H")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"{who} bias {tuple(b.shape)} must be [{w.shape[0]}] to match weight {tuple(w.shape)}")
        check_float(f"{who} hidden states", h, allowed)
        for name, x in (("weight", w), ("bias", b)):
            master = who == "student" and x is not None and x.dtype == torch.float32 and h.dtype in _HALF
            if x is not None and x.dtype != h.dtype and not master:
                raise ValueError(f"{who} {name} is {x.dtype} but its hidden states are {h.dtype}; cast one of them "
                                 "(an fp32 student weight with bf16/fp16 hidden states is accepted)")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student hidden {tuple(hs.shape)} and teacher hidden {tuple(ht.shape)} cover different "
                         f"tokens")
    return hs.shape[:-1]
