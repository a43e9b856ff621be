"""Per-token statistics (docs/design.md §4) in one pass over the vocabulary, and Min-K%: CUDA, C++ or chunked torch.

Not differentiable (they score, they don't train): inputs are read without recording a graph. Each function runs
as one torch.library custom op (kdfast::token_stats, ...) with a fake registered, so torch.compile traces it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from kdfast import _ext, reference
from kdfast.ops._checks import check_choice, check_label_values
from kdfast.runtime import HIDDEN_STATS_LOGIT_BYTES, TOKEN_STATS_CPU_CHUNK_BYTES, TOKEN_STATS_GPU_CHUNK_BYTES

BACKENDS = ("auto", "cuda", "cpp", "torch", "reference")
DEFAULT_KS = (0.05, 0.1, 0.2, 0.3, 0.5)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The TokenStats fields in order, as the custom ops return them (their schema needs a fixed-length tuple).
_Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# 2 is the kernels' own guard on the target; check_label_values raises first, with the losses' message.
_STATUS = {1: "has NaN or +inf logits", 2: "has a target outside [0, V)", 3: "has no finite logit (all -inf)"}


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics, each shaped like the targets ([N] or [B, T]).

    logp: log p(target) fp32; lse: logsumexp of the logits fp32; entropy: H = -sum p log p fp32;
    mu: sum p log p = -H fp32; sigma: std of log p under p fp32 (Min-K%++ normalizes by mu and sigma);
    top1: bool, the target is the argmax (ties go to the lowest index); valid: bool, target != ignore_index.
    Where valid is False every statistic is 0 and top1 is False.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    top1: torch.Tensor
    valid: torch.Tensor


def _resolve(backend: str, device: torch.device) -> str:
    """The backend that will run: 'auto' picks the kernel for the device, else the torch path."""
    check_choice("backend", backend, BACKENDS)
    if backend in ("torch", "reference"):
        return backend
    if backend == "auto":
        ext = _ext.load()
        if device.type == "cuda":
            return "cuda" if ext.cuda else "torch"
        return "cpp" if device.type == "cpu" and ext.ops is not None else "torch"
    if (backend == "cuda") != (device.type == "cuda") or device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend {backend!r} cannot run on a {device.type} tensor")
    ext = _ext.load()
    if ext.ops is None or backend == "cuda" and not ext.cuda:
        raise RuntimeError(f"backend {backend!r} is not available: {ext.reason}")
    return backend


def active_backend(device: torch.device | str | None = None) -> str:
    """What backend="auto" runs on device ("cuda", "cpp" or "torch"); default device: cuda when available."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _resolve("auto", device)


_ext.register_backend("token_stats", active_backend)


def _raise_bad_rows(status: torch.Tensor, lead_shape: torch.Size) -> None:
    bad = status.nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        where = f"row {row}"
        if len(lead_shape) > 1:
            where += f" (position {tuple(int(i) for i in torch.unravel_index(torch.tensor(row), lead_shape))})"
        raise ValueError(f"token_stats: {where} {_STATUS[int(status[row])]}")


def _kernel_view(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] or [B, T, V] with a contiguous last dimension, copying only when no such view exists."""
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.shape[-2], logits.shape[-1])
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _row_blocks(logits: torch.Tensor) -> list[torch.Tensor]:
    """The rows of logits [..., V] as [n, V] views, in order: one when the leading dims flatten without a copy,
    else one per leading index (e.g. logits[:, :-1] of [B, T, V])."""
    try:
        return [logits.view(-1, logits.shape[-1])]
    except RuntimeError:
        return [b for sub in logits for b in _row_blocks(sub)]


def _torch_stats(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel's math in torch, a chunk of rows at a time: z [N, V], y [N] -> 5 stats, top1, status."""
    n, v = z.shape
    budget = TOKEN_STATS_GPU_CHUNK_BYTES if z.is_cuda else TOKEN_STATS_CPU_CHUNK_BYTES
    rows = max(1, budget // (4 * v))
    f32 = dict(dtype=torch.float32, device=z.device)
    out = [torch.zeros(n, **f32) for _ in range(5)]
    top1 = torch.zeros(n, dtype=torch.bool, device=z.device)
    status = torch.where(valid & ((y < 0) | (y >= v)), 2, 0).to(torch.uint8)
    for i in range(0, n, rows):
        sl = slice(i, min(n, i + rows))
        zc = z[sl].float()
        m = zc.amax(-1, keepdim=True)  # NaN when the row has a NaN, +inf with a +inf: caught below
        d = (zc - m).clamp_min_(-200.0)  # exp(-200) is 0 in fp32; the clamp keeps 0 * (-inf) out of the sums
        e = d.exp()
        s0 = e.sum(-1)
        e.mul_(d)
        s1 = e.sum(-1)
        s2 = e.mul_(d).sum(-1)
        log_s0 = s0.log()
        mean = s1 / s0
        m = m.squeeze(-1)
        lse = m + log_s0
        yc = y[sl].clamp(0, v - 1)
        # z_y - m is exact for a near-maximal target, so logp stays accurate under a large common offset
        stats = ((zc.gather(-1, yc[:, None]).squeeze(-1) - m) - log_s0, lse, log_s0 - mean, mean - log_s0,
                 (s2 / s0 - mean * mean).clamp_min(0).sqrt())
        ok = valid[sl] & (status[sl] == 0)
        bad = torch.where(m.isnan() | (m == math.inf), 1, torch.where(m == -math.inf, 3, 0)).to(torch.uint8)
        status[sl] = torch.where(ok, bad, status[sl])
        ok &= bad == 0
        for o, s in zip(out, stats):
            o[sl] = torch.where(ok, s, 0.0)
        top1[sl] = ok & (zc.argmax(-1) == yc)
    return (*out, top1, status)


@torch.no_grad()
def token_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                backend: str = "auto") -> TokenStats:
    """Per-token statistics of docs/design.md §4 in one pass over the vocabulary.

    logits: [N, V] or [B, T, V] (any leading dims), float32/bfloat16/float16, read in its own dtype and
    accumulated in fp32 (a view such as logits[:, :-1] is read without a copy). targets: integer, shaped like
    logits[..., 0]; positions equal to ignore_index get zeros and valid=False.
    backend: "auto" (CUDA kernel on GPU, C++ kernel on CPU, else torch), or force "cuda", "cpp", "torch",
    "reference" (float64 materialized softmax; tests).
    Raises ValueError naming the first row whose (valid) logits hold NaN or +inf or are all -inf, and on a target
    that is neither in [0, V) nor ignore_index (check_label_values, as the losses). -inf logits are fine.
    """
    if logits.dim() < 2 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"token_stats: logits [..., V] and targets [...] must agree, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"token_stats: logits must be floating point, got {logits.dtype}")
    if targets.device != logits.device:
        raise ValueError("token_stats: logits and targets must be on one device")
    return TokenStats(*_token_stats_op(logits, targets, ignore_index, backend))


@torch.library.custom_op("kdfast::token_stats", mutates_args=())
def _token_stats_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                    backend: str) -> _Stats:
    """The TokenStats fields of token_stats, as one op torch.compile does not look into (the kernels and the
    bad-row check sync with the host)."""
    check_label_values(targets, logits.shape[-1], ignore_index)
    lead = logits.shape[:-1]
    y = targets.reshape(-1).long()
    valid = y != ignore_index
    *five, top1, status = _compute(logits, y, valid, ignore_index, _resolve(backend, logits.device))
    _raise_bad_rows(status, lead)
    return (*(t.view(lead) for t in five), top1.view(lead), valid.view(lead))


@_token_stats_op.register_fake
def _(logits, targets, ignore_index, backend):
    return _fake_stats(logits, logits.shape[:-1])


def _fake_stats(like: torch.Tensor, lead: torch.Size) -> _Stats:
    """Empty TokenStats fields shaped lead: five fp32, then top1 and valid bool."""
    return (*(like.new_empty(lead, dtype=torch.float32) for _ in range(5)),
            like.new_empty(lead, dtype=torch.bool), like.new_empty(lead, dtype=torch.bool))


def _compute(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, ignore_index: int,
             run: str) -> tuple[torch.Tensor, ...]:
    """logits [..., V], y and valid [N] flat -> logp, lse, entropy, mu, sigma, top1, status, each [N]."""
    if logits.dtype not in _KERNEL_DTYPES and run in ("cuda", "cpp"):
        run = "torch"  # the kernels read fp32/bf16/fp16; float64 (a test input) takes the torch path
    if run == "reference":
        ref = reference.token_stats(logits.double().reshape(-1, logits.shape[-1]), y, ignore_index)
        status = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
        return (*(ref[k].float() for k in ("logp", "lse", "entropy", "mu", "sigma")), ref["top1"], status)
    if run == "torch":
        parts, start = [], 0
        for block in _row_blocks(logits):
            stop = start + block.shape[0]
            parts.append(_torch_stats(block, y[start:stop], valid[start:stop]))
            start = stop
        return tuple(torch.cat(p) for p in zip(*parts))
    return tuple(_ext.load().ops.token_stats(_kernel_view(logits), y.contiguous(), ignore_index))


@torch.no_grad()
def token_stats_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            bias: torch.Tensor | None = None, chunk_size: int | None = None,
                            ignore_index: int = -100, backend: str = "auto") -> TokenStats:
    """token_stats of the logits hidden @ weight.T + bias without ever holding all of them.

    hidden: [N, H] or [B, T, H]; weight: [V, H] (the LM head); bias: [V] or None; targets shaped like
    hidden[..., 0]. Only positions with a valid target are projected, chunk_size of them at a time
    (None: as many as fit 256 MiB of logits). The logits come out in hidden's dtype (as the model's head
    would produce them) and the statistics are those of token_stats.
    """
    if (hidden.dim() < 2 or targets.shape != hidden.shape[:-1] or weight.dim() != 2
            or weight.shape[1] != hidden.shape[-1]):
        raise ValueError(f"token_stats_from_hidden: hidden [..., H], weight [V, H], targets [...] must agree, got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"token_stats_from_hidden: chunk_size must be at least 1 (or None), got {chunk_size}")
    return TokenStats(*_token_stats_from_hidden_op(hidden, weight, targets, bias, chunk_size, ignore_index,
                                                   backend))


@torch.library.custom_op("kdfast::token_stats_from_hidden", mutates_args=())
def _token_stats_from_hidden_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                bias: torch.Tensor | None, chunk_size: int | None, ignore_index: int,
                                backend: str) -> _Stats:
    lead, v = hidden.shape[:-1], weight.shape[0]
    check_label_values(targets, v, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    valid = y != ignore_index
    kept = valid.nonzero().squeeze(-1)
    if chunk_size is None:
        chunk_size = max(1, HIDDEN_STATS_LOGIT_BYTES // (v * hidden.element_size()))
    run = _resolve(backend, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    out = [torch.zeros(h.shape[0], **f32) for _ in range(5)] + [torch.zeros(h.shape[0], dtype=torch.bool,
                                                                            device=hidden.device)]
    status = torch.zeros(h.shape[0], dtype=torch.uint8, device=hidden.device)
    for i in range(0, kept.numel(), chunk_size):
        idx = kept[i:i + chunk_size]
        *chunk, chunk_status = _compute(F.linear(h[idx], weight, bias), y[idx], valid[idx], ignore_index, run)
        for o, c in zip(out, chunk):
            o[idx] = c
        status[idx] = chunk_status
        _raise_bad_rows(status, lead)  # named by its position in hidden, not in the chunk
    return (*(t.view(lead) for t in out), valid.view(lead))


@_token_stats_from_hidden_op.register_fake
def _(hidden, weight, targets, bias, chunk_size, ignore_index, backend):
    return _fake_stats(hidden, hidden.shape[:-1])


def min_k_counts(n_valid: torch.Tensor, ks: Sequence[float]) -> torch.Tensor:
    """reference.min_k_count(k, n) for every row and k at once: [B] -> [B, K] int64 (float64 math, the same
    rounding as the scalar rule)."""
    k = torch.tensor(list(ks), dtype=torch.float64, device=n_valid.device)
    return torch.ceil(k[None, :] * n_valid.double()[:, None] - 1e-9).clamp_min(1).long()


def _min_k_torch(values: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Sort-based, vectorized over sequences: +inf fills the invalid slots, so the lowest counts are valid values."""
    if values.shape[1] == 0:
        return torch.zeros(counts.shape, dtype=torch.float32, device=values.device)
    v = torch.where(mask, values.double(), math.inf).sort(dim=1).values
    sums = v.cumsum(dim=1).gather(1, counts - 1)
    return torch.where(n[:, None] > 0, sums / counts, 0.0).float()


@torch.no_grad()
def min_k(values: torch.Tensor, mask: torch.Tensor | None = None, ks: Sequence[float] = DEFAULT_KS,
          backend: str = "auto") -> torch.Tensor:
    """Min-K%: per sequence, the mean of the lowest ceil(k n) (at least 1) valid values, for each k at once.

    values: [B, T] (or [T]) float, e.g. TokenStats.logp or the Min-K%++ scores; mask: bool like values
    (None: all valid); ks: fractions in (0, 1]. n is the sequence's number of valid values; the count is
    reference.min_k_count(k, n) exactly. Returns [B, len(ks)] (or [len(ks)]) float32; sequences
    without a valid value give 0. Sums run in float64 before the fp32 result.
    backend: "auto", "cuda" (sequences up to 8192 tokens; longer ones use torch), "cpp", "torch", "reference".
    """
    ks = tuple(float(k) for k in ks)
    if not ks or any(not 0.0 < k <= 1.0 for k in ks):
        raise ValueError(f"min_k: every k must lie in (0, 1], got {ks}")
    squeeze = values.dim() == 1
    if squeeze:
        values = values[None]
        mask = None if mask is None else mask[None]
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"min_k: values [B, T] and mask [B, T] must agree, got {tuple(values.shape)} and "
                         f"{tuple(mask.shape)}")
    out = _min_k_op(values, mask, list(ks), backend)
    return out[0] if squeeze else out


@torch.library.custom_op("kdfast::min_k", mutates_args=())
def _min_k_op(values: torch.Tensor, mask: torch.Tensor, ks: list[float], backend: str) -> torch.Tensor:
    """min_k on [B, T] values and mask: [B, len(ks)] fp32."""
    if torch.isnan(values).logical_and(mask).any():
        raise ValueError("min_k: values hold NaN at valid positions")
    run = _resolve(backend, values.device)
    if run == "reference":
        return reference.min_k(values.cpu(), mask.cpu(), ks).float().to(values.device)
    n = mask.sum(dim=1)
    counts = min_k_counts(n, ks)
    if run == "cuda" and values.shape[1] > _ext.load().ops.min_k_cuda_max_t():
        run = "torch"
    if run == "torch":
        return _min_k_torch(values, mask, counts, n)
    return _ext.load().ops.min_k(values.float().contiguous(), mask.contiguous(), counts)


@_min_k_op.register_fake
def _(values, mask, ks, backend):
    return values.new_empty((values.shape[0], len(ks)), dtype=torch.float32)
