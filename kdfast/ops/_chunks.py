"""The token-chunk driver of the fused-linear ops, dense or sparse teacher: a chunk of hidden states through the LM
head, its fused divergence pass, the loss summed and the head's gradients accumulated, so that the [N, V] logits
never exist whole. The argument checks both ops share live here too."""
from __future__ import annotations

from collections.abc import Callable

import torch

from kdfast.ops._checks import FLOAT_DTYPES, check_label_values, raise_if_nonfinite
from kdfast.ops.divergence import (
    BAD_STUDENT,
    BAD_TEACHER,
    DivergenceOut,
    check_loss_args,
    resolve_backend,
    times_grad_output,
)
from kdfast.runtime import FUSED_LINEAR_CPU_CHUNK_BYTES, FUSED_LINEAR_GPU_CHUNK_BYTES, FUSED_LINEAR_GPU_MIN_CHUNK

REDUCTIONS = ("mean", "sum")

# divergence(sl, student_logits, teacher_logits or None, labels or None, **pass arguments) -> the chunk's pass
ChunkPass = Callable[..., DivergenceOut]


def pick_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk so that the chunk's two [chunk, V] logit blocks fit the memory budget of the device."""
    per_token = 2 * vocab * dtype.itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        chunk = max(FUSED_LINEAR_GPU_MIN_CHUNK, min(FUSED_LINEAR_GPU_CHUNK_BYTES, free // 8) // per_token // 256 * 256)
    else:
        chunk = max(32, FUSED_LINEAR_CPU_CHUNK_BYTES // per_token // 32 * 32)
    return max(1, min(chunk, n_tokens))


def check_args(op: str, kind: str, reduction: str, beta: float, alpha: float, temperature: float, backend: str,
               device: torch.device) -> tuple[str, tuple[torch.dtype, ...]]:
    """The checks a fused-linear op starts with; returns the resolved backend (there is no fused-linear reference
    path) and the float dtypes it takes."""
    check_loss_args(kind, reduction, REDUCTIONS, beta, alpha, temperature)
    backend = resolve_backend(backend, device)
    if backend == "reference":
        raise ValueError(f"{op} runs the 'triton' or 'torch' backend (or 'auto')")
    return backend, FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())


def chunk_rows(chunk_size: int | None, hidden: torch.Tensor, vocab: int) -> int:
    """Tokens per chunk: chunk_size as given (checked), else from the shapes and the device's memory budget."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = hidden.numel() // hidden.shape[-1]
    return chunk_size or pick_chunk_size(n, vocab, hidden.dtype, hidden.device)


def check_targets(labels: torch.Tensor | None, ignore_index: int, vocab: int, hard_weight: float) -> None:
    if labels is None and hard_weight != 0.0:
        raise ValueError("hard_weight != 0 needs labels (the hard loss targets)")
    check_label_values(labels, vocab, ignore_index)


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunked_loss(ctx, spec, student: tuple, hs2: torch.Tensor, labels: torch.Tensor | None,
                 kept: torch.Tensor | None, vocab: int, scale: float | torch.Tensor, divergence: ChunkPass,
                 teacher: tuple | None = None) -> torch.Tensor:
    """The forward of a fused-linear autograd.Function once the tokens that count are chosen.

    student: its (hidden, weight, bias) as given; hs2 [m, H] and labels [m]: the tokens that count, kept their
    indices among the call's tokens (None: all). teacher: dense (hidden rows [m, H'], weight [V, H'], bias), whose
    logits are made per chunk without grad, or None (divergence holds the sparse teacher). scale: the reduction's
    1/count. spec: the op's arguments (_FusedLinearArgs, _SparseFusedLinearArgs: weights, chunk size, divergence
    arguments). Saves the gradients on ctx.
    """
    hs, ws, bs = student
    want_h, want_w, want_b = (spec.grad_enabled and need for need in ctx.needs_input_grad[:3])
    grads = Grads(hs2, ws, bs, want_h, want_w, want_b, spec.accum_dtype)
    # An fp32 master head with bf16/fp16 hidden states: one cast for the GEMMs; its gradient is accumulated in
    # fp32 and handed back as it is (no low-precision copy of d(weight), no cast back through autograd).
    head = (ws.to(hs.dtype)[:vocab], None if bs is None else bs.to(hs.dtype)[:vocab])
    total, bad = _sum_chunks(spec, head, hs2, labels, kept, hs.numel() // hs.shape[-1], scale, grads, divergence,
                             teacher)
    del head
    raise_if_nonfinite(bad, BAD_STUDENT, BAD_TEACHER)
    ctx.save_for_backward(*grads.finish(hs, ws, bs, kept))
    return (total * scale).to(total.dtype)


def _sum_chunks(spec, head, hs2, labels, kept, n, scale, grads, divergence, teacher):
    """Σ soft_weight·divergence + hard_weight·CE over the chunks, and the [n] bad-row flags."""
    soft_weight = spec.soft_weight * (spec.temperature**2 if spec.scale_by_t2 else 1.0)
    hard_weight = spec.hard_weight if spec.hard_weight != 0.0 else None
    pass_args = dict(kind=spec.kind, beta=spec.beta, alpha=spec.alpha, temperature=spec.temperature,
                     ignore_index=spec.ignore_index, soft_scale=soft_weight * scale,
                     hard_scale=None if hard_weight is None else hard_weight * scale, want_student_grad=grads.wanted,
                     backend=spec.backend)
    total = torch.zeros((), dtype=loss_dtype(hs2), device=hs2.device)
    bad = torch.zeros(n, dtype=torch.int32, device=hs2.device)
    m = hs2.shape[0]
    for i in range(0, m, spec.chunk_size):
        sl = slice(i, min(i + spec.chunk_size, m))
        logits = linear(hs2[sl], *head)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = linear(teacher[0][sl], *teacher[1:])
        out = divergence(sl, logits, teacher_logits, None if labels is None else labels[sl],
                         student_grad_out=logits, **pass_args)
        del teacher_logits
        total += soft_weight * out.loss.sum()
        if hard_weight is not None:
            total += hard_weight * out.hard_loss.sum()
        bad[sl if kept is None else kept[sl]] = out.bad
        if grads.wanted:
            grads.add_chunk(sl, out.grad_student, hs2[sl], head[0])
        del logits, out  # the last chunk's logits must not outlive the loop
    return total, bad


def scaled_saved(ctx, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
    """The backward of the fused-linear Functions: the gradients the forward saved, times grad_output."""
    return [times_grad_output(g, grad_output, False) for g in ctx.saved_tensors]


class Grads:
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

    def finish(self, hs, ws, bs, kept: torch.Tensor | None):
        """Gradients in the inputs' shapes and dtypes (kept: the tokens that count; the others get zeros)."""
        h = self.h
        if h is not None and kept is not None:
            h = h.new_zeros(hs.numel() // hs.shape[-1], hs.shape[-1]).index_copy_(0, kept, h)
        return (None if h is None else h.view(hs.shape),
                None if self.w is None else self.w.to(ws.dtype),
                None if self.b is None else self.b.to(bs.dtype))


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


def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())
