"""LiRA (Carlini et al., S&P 2022, "Membership Inference Attacks From First Principles"), offline, on mean ℓ_t."""
from __future__ import annotations

import numpy as np

# Below this many references a per-record σ_out is too noisy: the fixed-variance variant takes over.
MIN_PER_RECORD = 4


def lira_scores(target_ll: np.ndarray, ref_ll: np.ndarray, min_per_record: int = MIN_PER_RECORD) -> np.ndarray:
    """(f(x;θ) − μ_out(x)) / σ_out(x) per record, f = mean ℓ_t; target_ll [n], ref_ll [R, n] of OUT references.

    μ_out(x) = mean over references of f(x; θ_ref); σ_out(x) their standard deviation (ddof 0) when
    R ≥ min_per_record, else one global σ: the standard deviation of every reference statistic over all the
    records (Carlini et al.'s fixed-variance variant, np.std of the whole OUT array). Higher = member. float64 [n].
    """
    ref_ll = np.atleast_2d(np.asarray(ref_ll, dtype=np.float64))
    mu = ref_ll.mean(0)
    if ref_ll.shape[0] >= min_per_record:
        sigma = ref_ll.std(0)
    else:
        finite = ref_ll[np.isfinite(ref_ll)]
        sigma = np.full(mu.shape, finite.std() if finite.size else np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(target_ll, dtype=np.float64) - mu) / sigma
