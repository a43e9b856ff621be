"""Fused-linear distillation: hidden states + LM heads in, loss and gradients out, one token chunk at a time."""
from __future__ import annotations

import dataclasses

import torch

from kdfast.ops._checks import (
    FLOAT_DTYPES,
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
from kdfast.ops.divergence import (
    BAD_STUDENT,
    BAD_TEACHER,
    KINDS,
    divergence_fwd_bwd,
    mean_scale,
    resolve_backend,
    times_grad_output,
)
from kdfast.runtime import FUSED_LINEAR_CPU_CHUNK_BYTES, FUSED_LINEAR_GPU_CHUNK_BYTES, FUSED_LINEAR_GPU_MIN_CHUNK

REDUCTIONS = ("mean", "sum")


def pick_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk so that the chunk's two [chunk, V] logit blocks fit the memory budget of the device."""
    per_token = 2 * vocab * dtype.itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        chunk = max(FUSED_LINEAR_GPU_MIN_CHUNK, min(FUSED_LINEAR_GPU_CHUNK_BYTES, free // 8) // per_token // 256 * 256)
    else:
        chunk = max(32, FUSED_LINEAR_CPU_CHUNK_BYTES // per_token // 32 * 32)
    return max(1, min(chunk, n_tokens))


@dataclasses.dataclass(frozen=True)
class _Spec:
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
                wt: torch.Tensor, bt: torch.Tensor | None, labels: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
        hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
        lab = None if labels is None else labels.reshape(-1)
        n, V = hs2.shape[0], spec.vocab
        scale = mean_scale(lab, n, spec.ignore_index) if spec.reduction == "mean" else 1.0
        rows = _kept_rows(lab, spec.ignore_index)
        if rows is not None:  # ignored rows add nothing: no logits for them
            hs2, ht2, lab = hs2[rows], ht2[rows], lab[rows]
        want_h, want_w, want_b = (spec.grad_enabled and need for need in ctx.needs_input_grad[:3])
        grads = _Grads(hs2, ws, bs, want_h, want_w, want_b, spec.accum_dtype)
        # An fp32 master head with bf16/fp16 hidden states: one cast for the GEMMs; its gradient is accumulated in
        # fp32 and handed back as it is (no low-precision copy of d(weight), no cast back through autograd).
        ws_c = ws.to(hs.dtype)
        bs_c = None if bs is None else bs.to(hs.dtype)
        soft = spec.soft_weight * (spec.temperature**2 if spec.scale_by_t2 else 1.0)
        hard = spec.hard_weight if spec.hard_weight != 0.0 else None
        total = torch.zeros((), dtype=_loss_dtype(hs), device=hs.device)
        bad = torch.zeros(n, dtype=torch.int32, device=hs.device)
        m = hs2.shape[0]
        for i in range(0, m, spec.chunk_size):
            sl = slice(i, min(i + spec.chunk_size, m))
            logits = _linear(hs2[sl], ws_c[:V], None if bs_c is None else bs_c[:V])
            with torch.no_grad():
                teacher_logits = _linear(ht2[sl], wt[:V], None if bt is None else bt[:V])
            out = divergence_fwd_bwd(
                logits, teacher_logits, None if lab is None else lab[sl], kind=spec.kind, beta=spec.beta,
                alpha=spec.alpha, temperature=spec.temperature, ignore_index=spec.ignore_index,
                soft_scale=soft * scale, hard_scale=None if hard is None else hard * scale,
                want_student_grad=grads.wanted, student_grad_out=logits, backend=spec.backend)
            del teacher_logits
            total += soft * out.loss.sum()
            if hard is not None:
                total += hard * out.hard_loss.sum()
            if rows is None:
                bad[sl] = out.bad
            else:
                bad[rows[sl]] = out.bad
            if grads.wanted:
                grads.add_chunk(sl, out.grad_student, hs2[sl], ws_c[:V])
            del logits, out  # the last chunk's logits must not outlive the loop
        del ws_c, bs_c
        raise_if_nonfinite(bad, BAD_STUDENT, BAD_TEACHER)
        ctx.save_for_backward(*grads.finish(hs, ws, bs, rows))
        return (total * scale).to(total.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        scaled = [None if g is None else (g if bool(grad_output == 1) else g * grad_output.to(g.dtype))
                  for g in ctx.saved_tensors]
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None


class _Grads:
    """d(hidden) rows per chunk; d(weight), d(bias) accumulated over chunks in accum_dtype."""

    def __init__(self, hs2, ws, bs, want_h, want_w, want_b, accum_dtype):
        self.h = torch.empty_like(hs2) if want_h else None
        self.w = torch.zeros(ws.shape, dtype=accum_dtype, device=ws.device) if want_w else None
        self.b = torch.zeros(bs.shape, dtype=accum_dtype, device=bs.device) if want_b else None
        self.wanted = want_h or want_w or want_b

    def add_chunk(self, sl: slice, grad_logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        V = grad_logits.shape[1]
        if self.h is not None:
            torch.mm(grad_logits, w, out=self.h[sl])
        if self.w is not None:
            _add_product(self.w[:V], grad_logits.t(), h)
        if self.b is not None:
            self.b[:V] += grad_logits.sum(0, dtype=self.b.dtype)

    def finish(self, hs, ws, bs, rows: torch.Tensor | None):
        """Gradients in the inputs' shapes and dtypes (rows: the kept rows; the others get zeros)."""
        h = self.h
        if h is not None and rows is not None:
            h = h.new_zeros(hs.numel() // hs.shape[-1], hs.shape[-1]).index_copy_(0, rows, h)
        return (None if h is None else h.view(hs.shape),
                None if self.w is None else self.w.to(ws.dtype),
                None if self.b is None else self.b.to(bs.dtype))


def _kept_rows(labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows whose label is not ignore_index; None when every row counts (one host sync)."""
    if labels is None:
        return None
    keep = labels != ignore_index
    return None if bool(keep.all()) else keep.nonzero().flatten()


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_WIDE_ADDMM = True  # addmm(..., out_dtype=fp32) on CUDA (torch >= 2.8); cleared on the first failure


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, where acc may be wider than a and b (fp32 accumulation of bf16 products)."""
    global _WIDE_ADDMM
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _WIDE_ADDMM:
        try:  # one GEMM with an fp32 epilogue: no [V, H] temporary in the input dtype
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _WIDE_ADDMM = False
    acc += a @ b  # the chunk product is rounded to the input dtype once, then summed in acc's dtype


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


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
    check_choice("divergence kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_unit_interval("beta", beta)
    check_unit_interval("alpha", alpha)
    check_temperature(temperature)
    backend = resolve_backend(backend, student_hidden.device)
    if backend == "reference":
        raise ValueError("fused_linear_distill_loss runs the 'triton' or 'torch' backend (or 'auto')")
    allowed = FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    lead = _check_shapes(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                         allowed)
    check_labels(labels, lead, what="hidden states")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                      labels=labels)
    V = common_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = student_hidden.numel() // student_hidden.shape[-1]
    chunk = chunk_size or pick_chunk_size(n, V, student_hidden.dtype, student_hidden.device)
    accum = accum_dtype or _loss_dtype(student_weight)
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
    _check_targets(labels, ignore_index, vocab, hard_weight)
    spec = _Spec(kind, beta, alpha, temperature, ignore_index, hard_weight, soft_weight, reduction, vocab,
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
    return hs.new_empty((), dtype=_loss_dtype(hs)), *grads


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


def _check_targets(labels: torch.Tensor | None, ignore_index: int, vocab: int, hard_weight: float) -> None:
    if labels is None and hard_weight != 0.0:
        raise ValueError("hard_weight != 0 needs labels (the hard loss targets)")
    check_label_values(labels, vocab, ignore_index)
