"""The study's memorization metric: greedy decoding from the instruction prompt, compared with the first
n ground-truth response tokens position by position (exact) and by normalized edit distance (approximate)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from kdfast.data import Encoded, encode
from kdfast.generation import eval_mode, generate, pad_token_id
from kdfast.models import context_len


@dataclass
class MatchResult:
    """Per-record results of match_accuracy; arrays are [R].

    accuracy: float64, the fraction of the compared positions where the greedy token equals the ground truth
    (the study's memorization accuracy). n_compared: int64, min(n_tokens, response tokens incl. EOS).
    edit_distance: float64, token-level Levenshtein distance between the first n_compared greedy tokens and
    the ground truth, divided by n_compared. approx: bool, edit_distance <= approx_threshold.
    generated_ids: the greedy tokens (at most n_tokens, cut after EOS); generated: their decoded text.
    """

    accuracy: np.ndarray
    n_compared: np.ndarray
    edit_distance: np.ndarray
    approx: np.ndarray
    generated_ids: list[list[int]]
    generated: list[str]
    n_tokens: int
    approx_threshold: float

    def __len__(self) -> int:
        return len(self.accuracy)

    @property
    def exact(self) -> np.ndarray:
        """[R] bool: every compared position matches (the first n_tokens response tokens reproduced)."""
        return self.accuracy == 1.0

    def to_frame(self, prefix: str = ""):
        """A pandas DataFrame, one row per record; column names get `prefix` (e.g. "teacher_")."""
        import pandas as pd

        cols = {"accuracy": self.accuracy, "exact": self.exact, "approx": self.approx,
                "edit_distance": self.edit_distance, "n_compared": self.n_compared, "generated": self.generated}
        return pd.DataFrame({prefix + k: v for k, v in cols.items()})


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev_diag, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (x != y))
    return row[-1]


def normalized_edit_distance(generated: list[int], truth: list[int]) -> float:
    """edit_distance(generated[:len(truth)], truth) / len(truth): 0 = identical, 1 = nothing in common.

    The generation is cut to the ground truth's length first, so text produced after it costs nothing.
    """
    if not truth:
        raise ValueError("normalized_edit_distance: the ground truth is empty")
    return edit_distance(generated[: len(truth)], truth) / len(truth)


def fit_prompts(tokenizer, records: list[dict], max_len: int | None, room: int) -> list[Encoded]:
    """encode() each record, a prompt cut from its start where `room` more tokens would not fit after it in
    max_len (None: no cut); the prompt's end stays next to the response marker, as does a leading BOS, as TRL
    truncates prompts. Encoded.truncated marks the records cut."""
    if max_len is not None and max_len <= room:
        raise ValueError(f"{room} tokens after the prompt leave no room for one in {max_len} positions; lower "
                         "n_tokens / suffix_len (CLI --n-tokens, --suffix-len)")
    limit = None if max_len is None else max_len - room
    return [encode(tokenizer, r, max_prompt_len=limit, where=f"record {i}", long_prompt="truncate")
            for i, r in enumerate(records)]


def match_accuracy(model: nn.Module, tokenizer, records: list[dict], n_tokens: int = 32, batch_size: int = 32,
                   approx_threshold: float = 0.1, *, max_len: int | None = None, progress: bool = True) -> MatchResult:
    """Greedy match accuracy of each instruction record (docs/design.md §6, the study's metric).

    The prompt is the record's full instruction prompt (kdfast.data.encode's prompt part, Alpaca template);
    the model decodes n_tokens greedily (KV cache, left-padded batches of batch_size, stopping after EOS);
    the first n_tokens generated tokens are compared position by position with the first n_tokens response
    tokens as encode tokenizes them (EOS appended), over the response's length when it is shorter. A
    generation that stops early counts its missing positions as mismatches. The approximate variant flags
    records whose normalized token edit distance is at most approx_threshold (0.1: within 10% of the
    compared length). A record's result does not depend on its batch. max_len: the tokens the model may
    see (default and at most: its positions); a longer prompt + n_tokens is cut by fit_prompts.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    if not 0.0 <= approx_threshold <= 1.0:
        raise ValueError(f"approx_threshold is a fraction of the compared tokens in [0, 1], got {approx_threshold}")
    if not records:
        raise ValueError("match_accuracy: no records")
    plain = [i for i, r in enumerate(records) if "text" in r]
    if plain:
        raise ValueError(f"match_accuracy needs instruction records (a prompt to answer); record {plain[0]} is a "
                         "plain {'text'} record: measure it with extraction(..., prefix_len=, suffix_len=) instead")
    encoded = fit_prompts(tokenizer, records, context_len(model, max_len), n_tokens)
    prompts = [e.input_ids[: e.prompt_len] for e in encoded]
    truths = [e.input_ids[e.prompt_len:][:n_tokens] for e in encoded]
    pad_id = pad_token_id(tokenizer)
    with eval_mode(model):
        generated = generate(model, prompts, n_tokens, pad_id=pad_id, eos_id=tokenizer.eos_token_id,
                             batch_size=batch_size, progress=progress, desc="greedy match")
    n = np.array([len(t) for t in truths], dtype=np.int64)
    hits = np.array([sum(g == t for g, t in zip(gen, truth)) for gen, truth in zip(generated, truths)])
    dist = np.array([normalized_edit_distance(gen, truth) for gen, truth in zip(generated, truths)])
    # 3/30 must count as "within 10%": compare with a hair of float slack
    return MatchResult(accuracy=hits / n, n_compared=n, edit_distance=dist, approx=dist <= approx_threshold + 1e-12,
                       generated_ids=generated, generated=tokenizer.batch_decode(generated, skip_special_tokens=True),
                       n_tokens=n_tokens, approx_threshold=approx_threshold)
