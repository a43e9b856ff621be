"""How memorization carries over from teacher to student, and how far the records a membership attack flags
coincide with the records a memorization measure flags (Jaccard index, Cohen's kappa, 2x2 counts)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Conditioned:
    """teacher_conditioned's figures at one tau.

    n_teacher: records the teacher matches above tau (accuracy > tau, strictly). student_mean: the student's
    mean match accuracy on them. n_both: those the student also matches above tau. student_fraction:
    n_both / n_teacher. The two readings of "the student memorizes X% of what the teacher memorizes" are
    student_mean and student_fraction; both are NaN when n_teacher is 0.
    """

    tau: float
    n_teacher: int
    n_both: int
    student_mean: float
    student_fraction: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Agreement:
    """Membership flags vs memorization flags over the same R records.

    both / mia_only / mem_only / neither: the 2x2 counts. jaccard: both / (records flagged by either), NaN when
    neither flags anything. kappa: Cohen's kappa of the two flag vectors (0 = chance-level agreement, 1 =
    identical), NaN when both flag vectors are the same constant. mia_threshold / mem_threshold: the cut-offs
    used (a record is flagged when its score >= the cut-off; None for boolean scores).
    """

    jaccard: float
    kappa: float
    both: int
    mia_only: int
    mem_only: int
    neither: int
    mia_threshold: float | None
    mem_threshold: float | None

    @property
    def n(self) -> int:
        return self.both + self.mia_only + self.mem_only + self.neither

    @property
    def mia_rate(self) -> float:
        return (self.both + self.mia_only) / self.n

    @property
    def mem_rate(self) -> float:
        return (self.both + self.mem_only) / self.n

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "n": self.n, "mia_rate": self.mia_rate, "mem_rate": self.mem_rate}


def _vector(name: str, values, unit: bool = False) -> np.ndarray:
    """A 1-D array of finite scores (bool kept as bool); unit=True also requires [0, 1]."""
    x = np.asarray(values.cpu() if hasattr(values, "cpu") else values)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-record scores, got shape {x.shape}")
    if x.dtype == bool:
        return x
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numbers or booleans, got {x.dtype}")
    x = x.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"{name} holds {bad.size} NaN/inf value(s) (first at record {bad[0]}); drop those records "
                         "from both score vectors first")
    if unit and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{name} must be match accuracies in [0, 1], got values in [{x.min()}, {x.max()}]")
    return x


def teacher_conditioned(teacher_acc, student_acc, taus: Sequence[float] = DEFAULT_TAUS) -> list[Conditioned]:
    """For each tau: among the records the teacher matches above tau, the student's mean match accuracy and
    the fraction the student also matches above tau (docs/design.md §6; "above" is strict: accuracy > tau).

    teacher_acc, student_acc: [R] match accuracies of the same records in the same order (e.g.
    MatchResult.accuracy of each model on the teacher's training records).
    """
    t, s = _vector("teacher_acc", teacher_acc, unit=True), _vector("student_acc", student_acc, unit=True)
    if t.shape != s.shape:
        raise ValueError(f"teacher_acc and student_acc must score the same records: {t.size} vs {s.size} values")
    levels = []
    for tau in taus:
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"every tau must lie in [0, 1), got {tau}")
        sel = t > tau
        n = int(sel.sum())
        both = int((s[sel] > tau).sum())
        levels.append(Conditioned(tau=float(tau), n_teacher=n, n_both=both,
                                student_mean=float(s[sel].mean()) if n else math.nan,
                                student_fraction=both / n if n else math.nan))
    return levels


def flag(scores, threshold: float | None = None, rate: float | None = None) -> tuple[np.ndarray, float | None]:
    """(flags [R] bool, cut-off) for scores where higher = more suspicious.

    threshold: flag scores >= threshold. rate: flag the top ceil(rate * R) scores, never choosing between
    equal scores: when a tie straddles the boundary, the tied records stay unflagged (so fewer than
    ceil(rate * R) may be flagged); the cut-off returned is the lowest flagged score (inf when none).
    Boolean scores with neither given are the flags themselves (cut-off None).
    """
    x = _vector("scores", scores)
    if threshold is not None and rate is not None:
        raise ValueError("give a threshold or a flag rate, not both")
    if x.dtype == bool:
        if threshold is not None or rate is not None:
            x = x.astype(np.float64)
        else:
            return x, None
    if threshold is not None:
        return x >= threshold, float(threshold)
    if rate is None:
        raise ValueError("give a threshold or a flag rate for numeric scores")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"flag rate must lie in (0, 1], got {rate}")
    k = min(x.size, math.ceil(rate * x.size - 1e-9))
    ranked = np.sort(x)[::-1]
    if k == x.size or ranked[k - 1] > ranked[k]:
        cut = ranked[k - 1]
    else:
        above = ranked[ranked > ranked[k]]
        cut = above.min() if above.size else math.inf
    return x >= cut, float(cut)


def _rate(scores: np.ndarray, threshold: float | None, rate: float | None) -> float | None:
    return None if threshold is not None or scores.dtype == bool else rate


def agreement(mia_scores, mem_scores, mia_threshold: float | None = None, mem_threshold: float | None = None,
              flag_rate: float | None = None) -> Agreement:
    """How far the records flagged as members and the records flagged as memorized coincide.

    mia_scores: [R] membership scores (higher = more likely a member); mem_scores: [R] memorization scores
    (e.g. match accuracy) or booleans (e.g. Extraction.extractable), same records in the same order. Each side
    is flagged at its threshold (score >= threshold) when given; else booleans are the flags as they are, and
    numbers are flagged at flag_rate (their top fraction, see flag(): matched rates compare two rankings).
    """
    from sklearn.metrics import cohen_kappa_score

    a, b = _vector("mia_scores", mia_scores), _vector("mem_scores", mem_scores)
    if a.shape != b.shape:
        raise ValueError(f"mia_scores and mem_scores must score the same records: {a.size} vs {b.size} values")
    fa, ta = flag(a, mia_threshold, _rate(a, mia_threshold, flag_rate))
    fb, tb = flag(b, mem_threshold, _rate(b, mem_threshold, flag_rate))
    both, a_only, b_only = int((fa & fb).sum()), int((fa & ~fb).sum()), int((~fa & fb).sum())
    union = both + a_only + b_only
    # both vectors the same constant: chance agreement is 1 and kappa is 0/0
    undefined = np.array_equal(fa, fb) and (fa.all() or not fa.any())
    kappa = math.nan if undefined else float(cohen_kappa_score(fa, fb))
    return Agreement(jaccard=both / union if union else math.nan, kappa=kappa, both=both, mia_only=a_only,
                     mem_only=b_only, neither=a.size - union, mia_threshold=ta, mem_threshold=tb)
