"""Con-ReCaLL (Wang et al., 2024, "Con-ReCall: Detecting Pre-training Data in LLMs via Contrastive Decoding").

Members gain likelihood after member prefixes and lose it after non-member ones; the contrast of the two.
"""
from __future__ import annotations

import numpy as np


def con_recall_scores(ll: np.ndarray, nonmember_ll: np.ndarray, member_ll: np.ndarray,
                      gamma: float = 1.0) -> np.ndarray:
    """(ll(x | non-member prefix) − γ·ll(x | member prefix)) / ll(x) per record (float64 [n]); higher = member.

    ll: the unconditioned mean ℓ_t; γ: the paper's contrast strength (mimir uses 1).
    """
    ll = np.asarray(ll, dtype=np.float64)
    return (np.asarray(nonmember_ll, dtype=np.float64) - gamma * np.asarray(member_ll, dtype=np.float64)) / ll
