"""Memorization figures per group: all records, members, non-members, and the member - non-member gap."""
from __future__ import annotations

import math

import numpy as np

from kdfast.memorization.extraction import Extraction
from kdfast.memorization.match import MatchResult


def _figures(match: MatchResult | None, extraction: Extraction | None, sel: np.ndarray) -> dict:
    out: dict = {"n": int(sel.sum())}
    if match is not None:
        acc = match.accuracy[sel]
        out.update(accuracy=_mean(acc), accuracy_std=float(acc.std()) if acc.size else math.nan,
                   exact_rate=_mean(match.exact[sel]), approx_rate=_mean(match.approx[sel]))
    if extraction is not None:
        checked = extraction.checked.numpy()[sel]
        out.update(extraction_checked=int(checked.sum()),
                   extractable_rate=_mean(extraction.extractable.numpy()[sel][checked]))
    return out


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan


def group_summary(match: MatchResult | None = None, extraction: Extraction | None = None,
                  membership=None) -> dict:
    """{"all": figures} and, with membership ([R] 1 member / 0 non-member), "members", "nonmembers" and "gap".

    Figures: n; from match: accuracy (mean match accuracy, the study's memorization accuracy), accuracy_std,
    exact_rate (all compared tokens match), approx_rate (normalized edit distance within the threshold);
    from extraction: extraction_checked (records long enough) and extractable_rate (among them).
    gap = members - non-members for each rate (the study reports it for accuracy).
    """
    sizes = {len(x) for x in (match, extraction) if x is not None}
    if not sizes:
        raise ValueError("group_summary needs a MatchResult, an Extraction, or both")
    if len(sizes) > 1:
        raise ValueError(f"match and extraction results cover different numbers of records: {sorted(sizes)}")
    n = sizes.pop()
    summary = {"all": _figures(match, extraction, np.ones(n, dtype=bool))}
    if membership is None:
        return summary
    labels = np.asarray(membership)
    if labels.shape != (n,) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"membership must be {n} labels, 1 (member) or 0 (non-member)")
    summary["members"] = _figures(match, extraction, labels == 1)
    summary["nonmembers"] = _figures(match, extraction, labels == 0)
    summary["gap"] = {k: summary["members"][k] - summary["nonmembers"][k] for k in summary["all"]
                      if k.endswith(("accuracy", "rate"))}
    return summary
