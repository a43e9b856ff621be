"""Is a model a working language model? Repetition, empty outputs and held-out cross-entropy of its greedy
generations, and the documented rule that flags a model *degenerate* (its leakage figures are then no evidence)."""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

_WORDY = re.compile(r"\w", re.UNICODE)


def _words(text: str) -> list[str]:
    # Whitespace words, punctuation kept: "-- -- --" and '"The "The' are loops too, which \w+ tokens would miss.
    return text.lower().split()


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]


def empty_rate(generations: Sequence[str]) -> float:
    """Share of generations without a single letter or digit (nothing, whitespace, or punctuation only)."""
    _check(generations)
    return sum(not _WORDY.search(g) for g in generations) / len(generations)


def repeated_ngram_rate(generations: Sequence[str], n: int = 4) -> float:
    """Mean over generations of the share of their word n-grams that repeat an earlier n-gram of the same
    generation (0: no loop; → 1: one phrase over and over). Generations shorter than n words count 0."""
    _check(generations)
    rates = []
    for g in generations:
        grams = _ngrams(_words(g), n)
        rates.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(rates) / len(rates)


def distinct_n(generations: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all n-grams of all generations together; low
    when the model loops or gives every prompt the same answer. 0 when there is no n-gram at all."""
    _check(generations)
    counts = Counter(gram for g in generations for gram in _ngrams(_words(g), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


@dataclass(frozen=True)
class DegeneracyRule:
    """The rule: a model is degenerate when any threshold is crossed on its held-out greedy generations.

    max_empty: share of empty generations above it; max_repeated_4gram: mean repeated-4-gram share above it
    (a normal definition or answer repeats almost none); min_distinct_2: corpus distinct-2 below it (one answer
    for every prompt); max_excess_cross_entropy: held-out cross-entropy (nats per response token) more than
    this above the pretrained base's (e^1.5 ≈ 4.5× its perplexity), or not finite. The base, not the fine-tuned
    teacher, is the reference: it is a working language model the students are cut from, and on the default run it
    is itself 1.7 nats above the teacher (4.76 against 3.04), so a teacher reference would flag it too.
    """

    max_empty: float = 0.5
    max_repeated_4gram: float = 0.3
    min_distinct_2: float = 0.2
    max_excess_cross_entropy: float = 1.5


def degeneracy_metrics(generations: Sequence[str], cross_entropy: float | None = None) -> dict[str, float | None]:
    """The figures the rule reads: empty_rate, repeated_4gram, distinct_2 of `generations` (greedy answers to
    held-out prompts) and the given held-out cross-entropy (mean nats per response token, None: not measured)."""
    return {"empty_rate": empty_rate(generations), "repeated_4gram": repeated_ngram_rate(generations, 4),
            "distinct_2": distinct_n(generations, 2),
            "cross_entropy": None if cross_entropy is None else float(cross_entropy)}


def degeneracy_reasons(metrics: dict, reference_cross_entropy: float | None = None,
                       rule: DegeneracyRule = DegeneracyRule()) -> list[str]:
    """Why the model with these degeneracy_metrics is degenerate under `rule` ([] when it is not).

    reference_cross_entropy: the pretrained base's held-out cross-entropy (None: the cross-entropy test is skipped).
    """
    reasons = []
    if metrics["empty_rate"] > rule.max_empty:
        reasons.append(f"{metrics['empty_rate']:.0%} of its answers are empty (rule: > {rule.max_empty:.0%})")
    if metrics["repeated_4gram"] > rule.max_repeated_4gram:
        reasons.append(f"its answers repeat themselves: {metrics['repeated_4gram']:.0%} of 4-grams are repeats "
                       f"(rule: > {rule.max_repeated_4gram:.0%})")
    if metrics["distinct_2"] < rule.min_distinct_2:
        reasons.append(f"distinct-2 of its answers is {metrics['distinct_2']:.2f} (rule: < {rule.min_distinct_2})")
    ce = metrics.get("cross_entropy")
    if ce is not None and not math.isfinite(ce):
        reasons.append("its held-out cross-entropy is not finite")
    elif ce is not None and reference_cross_entropy is not None \
            and ce - reference_cross_entropy > rule.max_excess_cross_entropy:
        reasons.append(f"held-out cross-entropy {ce:.2f} nats, {ce - reference_cross_entropy:.2f} above the "
                       f"pretrained base's (rule: > {rule.max_excess_cross_entropy})")
    return reasons


def assess(generations: Sequence[str], cross_entropy: float | None = None,
           reference_cross_entropy: float | None = None, rule: DegeneracyRule = DegeneracyRule()) -> dict:
    """degeneracy_metrics plus the verdict: {..., "degenerate": bool, "reasons": [str], "rule": {...}}."""
    metrics = degeneracy_metrics(generations, cross_entropy)
    reasons = degeneracy_reasons(metrics, reference_cross_entropy, rule)
    return {**metrics, "degenerate": bool(reasons), "reasons": reasons, "rule": asdict(rule)}


def _check(generations: Sequence[str]) -> None:
    if isinstance(generations, str):
        raise TypeError("give a list of generations, not one string")
    if not len(generations):
        raise ValueError("no generations to assess")
