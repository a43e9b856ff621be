"""Plain, obviously-correct formulas (docs/design.md §3, §4): the oracle every fast path is tested against.

Written for clarity, not speed: they materialize full softmaxes. Pass float64 tensors for exact checks.
"""
from __future__ import annotations

import math

import torch

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Σ a·(log a − log b) over live entries (the logs are already finite everywhere)."""
    return torch.where(live, a * (log_a - log_b), 0.0).sum(-1)


def _log_mix(w_a: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(w_a·a + (1 − w_a)·b) computed in log space, for 0 < w_a < 1."""
    return torch.logaddexp(log_a + math.log(w_a), log_b + math.log1p(-w_a))


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence between teacher p and student q (docs/design.md §3).

    student_logits, teacher_logits: [..., V] float; returns [...] in the promoted float dtype.
    Entries that are −inf in either model contribute 0. β=0 of `jsd` is `fkl`, β=1 is `rkl`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {KINDS}")
    s = _float(student_logits) / temperature
    t = _float(teacher_logits) / temperature
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype), t.to(dtype)
    live = torch.isfinite(s) & torch.isfinite(t)
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    # Dead entries are zeroed before any log-space mixing: logaddexp(−inf, −inf) has a NaN gradient.
    log_p, log_q = torch.where(live, log_p, 0.0), torch.where(live, log_q, 0.0)

    if kind == "jsd" and beta == 0.0 or kind == "skl" and alpha == 0.0:
        kind = "fkl"
    if kind == "jsd" and beta == 1.0 or kind == "srkl" and alpha == 0.0:
        kind = "rkl"
    if kind == "fkl":
        return _kl_terms(p, log_p, log_q, live)
    if kind == "rkl":
        return _kl_terms(q, log_q, log_p, live)
    if kind == "jsd":
        log_m = _log_mix(beta, log_p, log_q)
        return beta * _kl_terms(p, log_p, log_m, live) + (1 - beta) * _kl_terms(q, log_q, log_m, live)
    if kind == "skl":
        if alpha == 1.0:
            return torch.zeros_like(p[..., 0])
        return _kl_terms(p, log_p, _log_mix(alpha, log_p, log_q), live)
    if kind == "srkl":
        if alpha == 1.0:
            return torch.zeros_like(q[..., 0])
        return _kl_terms(q, log_q, _log_mix(1 - alpha, log_p, log_q), live)
    diff = torch.where(live, p - q, torch.zeros_like(p))
    return 0.5 * diff.abs().sum(-1)


def reduce(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mask invalid tokens to 0, then `mean` over valid tokens (0 when none), `sum`, or `none`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / valid.sum().clamp_min(1) if reduction == "mean" else total


def _reduce_labelled(per_token: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
                     reduction: str) -> torch.Tensor:
    """reduce() over the tokens whose label is not ignore_index (every token without labels)."""
    valid = torch.ones_like(per_token, dtype=torch.bool) if labels is None else labels != ignore_index
    return reduce(per_token, valid, reduction)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """Masked, reduced divergence: logits [..., V], labels [...] (positions == ignore_index are masked)."""
    per_token = divergence(student_logits, teacher_logits, kind, beta, alpha, temperature)
    out = _reduce_labelled(per_token, labels, ignore_index, reduction)
    return out * temperature**2 if scale_by_t2 else out


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Hard-label loss −log q(y): logits [..., V], labels [...]."""
    log_q = torch.log_softmax(_float(logits), dim=-1)
    valid = labels != ignore_index
    nll = -log_q.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return reduce(nll, valid, reduction)


def token_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Per-token statistics of docs/design.md §4 from a materialized softmax: logits [..., V], targets [...].

    Returns logp, lse, entropy, mu, sigma (float), top1 (bool: the target is the first argmax) and valid.
    Undefined statistics (ignored targets) are 0 / False.
    """
    z = _float(logits)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    log_p = z - lse.unsqueeze(-1)
    p = log_p.exp()
    finite = torch.isfinite(log_p)
    p_log_p = torch.where(finite, p * torch.where(finite, log_p, 0), 0)
    mu = p_log_p.sum(-1)
    centered = torch.where(finite, log_p - mu.unsqueeze(-1), 0)
    sigma = (p * centered**2).sum(-1).clamp_min(0).sqrt()
    logp_target = log_p.gather(-1, safe).squeeze(-1)
    top1 = z.argmax(-1) == safe.squeeze(-1)
    zero = torch.zeros_like(lse)
    return {
        "logp": torch.where(valid, logp_target, zero),
        "lse": torch.where(valid, lse, zero),
        "entropy": torch.where(valid, -mu, zero),
        "mu": torch.where(valid, mu, zero),
        "sigma": torch.where(valid, sigma, zero),
        "top1": top1 & valid,
        "valid": valid,
    }


def min_k_count(k: float, n: int) -> int:
    """How many of n values Min-K% averages: ⌈k·n⌉ (a 1e-9 slack absorbs k·n's rounding), at least 1."""
    return max(1, math.ceil(k * n - 1e-9))


def min_k(values: torch.Tensor, mask: torch.Tensor, ks=(0.05, 0.1, 0.2, 0.3, 0.5)) -> torch.Tensor:
    """Min-K% by sorting each row: values [B, T], mask [B, T] bool -> [B, len(ks)] float64.

    Each entry is the mean of the lowest min_k_count(k, n) valid values of the row; a row with no valid
    value gives 0.
    """
    out = torch.zeros(values.shape[0], len(ks), dtype=torch.float64)
    for b in range(values.shape[0]):
        row = values[b][mask[b]].double().sort().values
        for j, k in enumerate(ks):
            if row.numel():
                out[b, j] = row[: min_k_count(k, row.numel())].mean()
    return out


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int | None = None,
        temperature: float = 1.0, student_log_scale: torch.Tensor | None = None,
        teacher_log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Universal Logit Distillation per token (Boizard et al., 2024): Σ_j |a_(j) − b_(j)|.

    a = e^{student_log_scale}·softmax(s/T) [..., Vs] and b likewise for the teacher [..., Vt], each sorted in
    decreasing order and padded with zeros to max(Vs, Vt); only the first top_k sorted entries count (None: all).
    −inf logits have probability 0; a row with no finite logit is all zeros. The log scales ([...] or None) merge
    several tokens into one distribution (kdfast.distill.align). Returns [...] in the promoted float dtype.
    """
    a, b = _sorted_probs(student_logits, temperature, student_log_scale), _sorted_probs(
        teacher_logits, temperature, teacher_log_scale)
    width = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[-1]))
    b = torch.nn.functional.pad(b, (0, width - b.shape[-1]))
    k = width if top_k is None else min(top_k, width)
    return (a[..., :k] - b[..., :k].to(a.dtype)).abs().sum(-1)


def _sorted_probs(logits: torch.Tensor, temperature: float, log_scale: torch.Tensor | None) -> torch.Tensor:
    x = _float(logits) / temperature
    alive = torch.isfinite(x).any(-1, keepdim=True)
    p = torch.softmax(torch.where(alive, x, 0.0), -1)  # a dead row's NaN softmax would poison the gradient
    p = torch.where(alive & (x != -math.inf), p, 0.0)
    if log_scale is not None:
        p = p * log_scale.to(p.dtype).exp().unsqueeze(-1)
    return p.sort(-1, descending=True).values


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int | None = None,
             temperature: float = 1.0, labels: torch.Tensor | None = None, ignore_index: int = -100,
             reduction: str = "mean", student_log_scale: torch.Tensor | None = None,
             teacher_log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Masked, reduced uld: labels [...] (ignore_index rows masked), as distill_loss."""
    per_token = uld(student_logits, teacher_logits, top_k, temperature, student_log_scale, teacher_log_scale)
    return _reduce_labelled(per_token, labels, ignore_index, reduction)


SPARSE_TAILS = ("bucket", "renorm")


def sparse_outcomes(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                    tail: str = "bucket", temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Q, log P) over the outcomes a sparse teacher defines, from the full student softmax at T.

    student_logits [..., V], teacher_ids [..., k] (distinct ids < V), teacher_logprobs [..., k] (log p under the
    teacher's full softmax at T). bucket: k+1 outcomes S ∪ {rest}, p_rest = 1 − Σ_S p, q_rest = Σ_{v∉S} q_v;
    renorm: the k outcomes of S with p renormalized over S and q the student's own (unrenormalized) probabilities.
    """
    s = _float(student_logits) / temperature
    log_q = torch.log_softmax(s, dim=-1)
    ids = teacher_ids.long()
    log_q_s = log_q.gather(-1, ids)
    log_p_s = teacher_logprobs.to(log_q.dtype)
    if tail == "renorm":
        return log_q_s, log_p_s - torch.logsumexp(log_p_s, dim=-1, keepdim=True)
    outside = log_q.scatter(-1, ids, -math.inf)
    log_q_rest = torch.logsumexp(outside, dim=-1, keepdim=True)
    log_p_rest = (1 - log_p_s.exp().sum(-1, keepdim=True)).clamp_min(0).log()
    return torch.cat([log_q_s, log_q_rest], -1), torch.cat([log_p_s, log_p_rest], -1)


def sparse_distill_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str = "fkl",
    tail: str = "bucket",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """The dense divergence (docs/design.md §3) on the outcomes of sparse_outcomes (log-probabilities are their own
    logits).

    renorm is defined for fkl only: every other kind needs the teacher's probabilities outside S.
    """
    if tail == "renorm" and kind != "fkl":
        raise ValueError(f"tail='renorm' is defined for kind='fkl' only, got {kind!r}")
    log_q, log_p = sparse_outcomes(student_logits, teacher_ids, teacher_logprobs, tail, temperature)
    if tail == "renorm":
        live = torch.isfinite(log_q) & torch.isfinite(log_p)
        log_q_live, log_p_live = torch.where(live, log_q, 0.0), torch.where(live, log_p, 0.0)
        per_token = _kl_terms(log_p_live.exp(), log_p_live, log_q_live, live)
    else:
        per_token = divergence(log_q, log_p, kind, beta, alpha)
    out = _reduce_labelled(per_token, labels, ignore_index, reduction)
    return out * temperature**2 if scale_by_t2 else out
