"""ReCaLL (Xie et al. 2024): ll(x | non-member prefix) / ll(x); conditioning on non-members lowers a member's
likelihood more."""
from __future__ import annotations

import random

import numpy as np
from torch import nn

from kdfast.attacks.bulk import mean_log_likelihoods
from kdfast.data import IGNORE_INDEX, Encoded
from kdfast.data.template import prompt_text, target_text


def choose_prefix(membership: list[int], shots: int = 3, seed: int = 0, members: bool = False) -> list[int]:
    """Indices of `shots` non-members (members: Con-ReCaLL's member prefix), a seeded choice, to serve as the
    prefix; they are held out from the recall scores."""
    pool = [i for i, m in enumerate(membership) if bool(m) == members]
    kind = "members" if members else "non-members"
    if len(pool) <= shots:
        raise ValueError(f"recall needs more than {shots} {kind} to take its prefix from (got {len(pool)}); "
                         f"lower recall_shots or pass {'member_prefix' if members else 'recall_prefix'}=[...] records")
    return sorted(random.Random(seed).sample(pool, shots))


def prefix_ids(tokenizer, prefix: list[dict]) -> list[int]:
    """Token ids of the prefix: each record in full (template + response), separated by blank lines."""
    text = "".join(prompt_text(r) + target_text(r) + "\n\n" for r in prefix)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conditioned(item: Encoded, prefix: list[int], bos_id: int | None) -> Encoded:
    """The item with the prefix inserted after its BOS (if any); the scored positions are the item's own.

    The item's first token is never predicted on its own, so it stays unscored after the prefix too.
    """
    head = 1 if bos_id is not None and item.input_ids[:1] == [bos_id] else 0
    labels = item.labels[head:]
    labels = [IGNORE_INDEX] + labels[1:] if head == 0 else labels
    return Encoded(item.input_ids[:head] + prefix + item.input_ids[head:],
                   [IGNORE_INDEX] * (head + len(prefix)) + labels, item.prompt_len + len(prefix))


def conditioned_ll(model: nn.Module, items: list[Encoded], prefix: list[int], bos_id: int | None,
                   max_len: int | None = None, **batching) -> np.ndarray:
    """ll(x | prefix): each item's mean ℓ_t of its own scored tokens after the prefix (float64 [len(items)]).

    With max_len (the model's context), an item keeps the prefix's end that fits before it; an item that
    fills max_len alone has no room for any and scores NaN.
    """
    room = [len(prefix) if max_len is None else min(len(prefix), max(0, max_len - len(it))) for it in items]
    fitted = [conditioned(it, prefix[len(prefix) - r:], bos_id) for it, r in zip(items, room)]
    fits = [max_len is None or len(it) < max_len for it in items]
    return np.where(fits, mean_log_likelihoods(model, fitted, **batching), np.nan)


def recall_scores(ll: np.ndarray, cond_ll: np.ndarray) -> np.ndarray:
    """ll(x | prefix) / ll(x) per item (float64); `ll` is each item's unconditioned mean ℓ_t."""
    return np.asarray(cond_ll, dtype=np.float64) / ll
