"""DC-PDD (Zhang et al., EMNLP 2024, "Pretraining Data Detection for Large Language Models: A Divergence-based
Calibration Method"): token probabilities calibrated by the tokens' frequencies in a reference corpus."""
from __future__ import annotations

import numpy as np

from kdfast.data import target_text

# The paper's upper bound on a token's contribution (its official code's default a = 0.01).
CLIP = 0.01


def token_frequencies(tokenizer, corpus: list[dict], vocab_size: int | None = None) -> np.ndarray:
    """Laplace-smoothed frequency of every token id, (count + 1) / (total + V), over `tokenizer(text)` of each
    corpus record's text (a response or a {"text"}); float64 [V].

    Every occurrence counts, as in the paper (its official code's `fre_dis[ids] += 1` counts a token once per
    document: torch does not accumulate repeated indices).
    """
    size = max(vocab_size or 0, len(tokenizer))
    counts = np.zeros(size, dtype=np.float64)
    for record in corpus:
        np.add.at(counts, np.asarray(tokenizer(target_text(record))["input_ids"], dtype=np.int64), 1)
    return (counts + 1) / (counts.sum() + size)


def dc_pdd_score(logp: np.ndarray, token_ids: np.ndarray, frequencies: np.ndarray, clip: float = CLIP) -> float:
    """β = mean over the first occurrence of each token of min(p(x_i) · log(1 / f(x_i)), clip).

    logp [n]: ℓ_t of a record's scored tokens in order; token_ids [n]: those tokens. NaN for no token.
    """
    if len(token_ids) == 0:
        return float("nan")
    _, first = np.unique(np.asarray(token_ids), return_index=True)
    alpha = np.exp(np.asarray(logp, dtype=np.float64)[first]) * -np.log(frequencies[np.asarray(token_ids)[first]])
    return float(np.minimum(alpha, clip).mean())
