"""The reference-model attack: loss_ref − loss_target, each model scoring the same text under its own tokenizer."""
from __future__ import annotations

import numpy as np
from torch import nn

from kdfast.attacks.bulk import encode_scored, mean_log_likelihoods
from kdfast.generation import pad_token_id
from kdfast.models import context_len


def ref_scores(ref_model: nn.Module, ref_tokenizer, records: list[dict], target_ll: np.ndarray,
               response_only: bool = True, max_len: int | None = None, numbers: list[int] | None = None,
               add_eos: bool = False, **batching) -> np.ndarray:
    """loss_ref − loss_target per record (float64): high when the target fits a record much better than the reference.

    target_ll: the target model's mean ℓ_t per record; numbers: the records' positions for error messages;
    add_eos: as in encode_scored; max_len: cut records to it, and to the reference's positions;
    `batching` goes to mean_log_likelihoods (batch_tokens, padding_side, autocast).
    """
    items = encode_scored(ref_tokenizer, records, response_only, context_len(ref_model, max_len), numbers, add_eos)
    ref_ll = mean_log_likelihoods(ref_model, items, pad_id(ref_tokenizer), **batching)
    return reference_scores(target_ll, ref_ll)


def reference_scores(target_ll: np.ndarray, ref_ll: np.ndarray) -> np.ndarray:
    """loss_ref − loss_target from mean log-likelihoods (loss = −ll): reuse a reference's ll across targets."""
    return np.asarray(target_ll, dtype=np.float64) - np.asarray(ref_ll, dtype=np.float64)


def pad_id(tokenizer) -> int:
    """The padding id (EOS when the tokenizer has no pad token: padded positions are masked anyway)."""
    pad = pad_token_id(tokenizer)
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; "
                         "set tokenizer.pad_token")
    return pad
