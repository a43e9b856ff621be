"""RMIA (Zarifzadeh et al., ICML 2024, "Low-Cost High-Power Membership Inference Attacks"), offline, on mean ℓ_t.

Pr(x|θ) = exp(mean_t ℓ_t), the geometric-mean token probability of the record under a model.
"""
from __future__ import annotations

import numpy as np

# Rows of the [records, population] comparison matrix held at once.
CHUNK = 1024


def offline_marginal(ref_ll: np.ndarray, a: float = 1.0) -> np.ndarray:
    """Pr(x) from OUT references only: ((1+a)·mean_r Pr(x|θ_r) + (1−a)) / 2; ref_ll [R, n] mean ℓ_t -> [n].

    a = 1 leaves the mean as it is. To set a as the paper does: take one reference as the target and the
    others as references, score records that reference was trained on against ones it was not, and keep
    the a with the highest AUC (a < 1 stands in for the IN models an offline attack lacks).
    """
    return ((1 + a) * np.exp(np.asarray(ref_ll, dtype=np.float64)).mean(0) + (1 - a)) / 2


def likelihood_ratio(target_ll: np.ndarray, ref_ll: np.ndarray, a: float = 1.0) -> np.ndarray:
    """Pr(x|θ) / Pr(x) per record: target_ll [n], ref_ll [R, n] (mean ℓ_t) -> float64 [n]."""
    return np.exp(np.asarray(target_ll, dtype=np.float64)) / offline_marginal(ref_ll, a)


def rmia_scores(target_ll: np.ndarray, ref_ll: np.ndarray, pop_target_ll: np.ndarray, pop_ref_ll: np.ndarray,
                a: float = 1.0, gamma: float = 1.0) -> np.ndarray:
    """score(x) = fraction of population records z with [Pr(x|θ)/Pr(x)] / [Pr(z|θ)/Pr(z)] ≥ γ (higher = member).

    target_ll [n], ref_ll [R, n]: the scored records; pop_target_ll [m], pop_ref_ll [R, m]: the population
    (non-members, disjoint from the scored records). The offline correction a applies to x and z alike.
    A record or population member with a NaN statistic (no scored token) is NaN / left out. float64 [n].
    """
    ratio_x = likelihood_ratio(target_ll, ref_ll, a)
    ratio_z = likelihood_ratio(pop_target_ll, pop_ref_ll, a)
    ratio_z = ratio_z[np.isfinite(ratio_z)]
    if ratio_z.size == 0:
        raise ValueError("rmia: no population record has a score; give population records with scored tokens")
    out = np.empty(ratio_x.shape)
    for start in range(0, ratio_x.size, CHUNK):
        part = ratio_x[start:start + CHUNK, None]
        out[start:start + CHUNK] = (part / ratio_z[None, :] >= gamma).mean(1)
    return np.where(np.isfinite(ratio_x), out, np.nan)
