"""The bulk scorer: loss, zlib, Min-K% and Min-K%++ of a whole batch from one forward pass (docs/design.md §5).

Only the scored positions reach the output head, and their per-token statistics come from kdfast's
fused kernels (kdfast.ops.token_stats); a record's scores do not depend on its batch or padding side.
"""
from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdfast.data import IGNORE_INDEX, Encoded, RecordError, encode, next_token_targets, pad_batch, token_budget_batches
from kdfast.data.template import prompt_text, target_text
from kdfast.models import ModelError, hidden_and_head, inference_context, model_device, output_head
from kdfast.ops.token_stats import min_k, token_stats, token_stats_from_hidden

# Logit elements materialized at once; a batch whose scored rows need more goes through the fused
# hidden-state path (token_stats_from_hidden), which never holds [N, V] logits.
LOGITS_LIMIT = 1 << 24
# Min-K%++ divides by σ_t; a (near) uniform next-token distribution has σ_t = 0, where the z-score is 0/0.
SIGMA_FLOOR = 1e-6


@dataclass
class BatchStats:
    """Per-token statistics of a padded batch at the scored positions (0 elsewhere).

    logp (ℓ_t = log p(x_t | x_<t)), mu (Σ p log p), sigma (std of log p under p): [B, T] fp32;
    valid: [B, T] bool, the positions that are scored.
    """

    logp: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    valid: torch.Tensor

    def n_tokens(self) -> np.ndarray:
        return self.valid.sum(1).cpu().numpy()

    def mean_ll(self) -> np.ndarray:
        """Mean ℓ_t over each row's scored tokens (float64 [B]; NaN for a row with none)."""
        total = self.logp.double().sum(1).cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_tokens() > 0, total / self.n_tokens(), np.nan)


def encode_scored(tokenizer, records: list[dict], response_only: bool = True, max_len: int | None = None,
                  numbers: list[int] | None = None, add_eos: bool = False) -> list[Encoded]:
    """Tokenize records as the field scores them; response_only=False also scores the prompt tokens.

    A {"text"} record is `tokenizer(text)` as it is (BOS only where the tokenizer adds one; its first token
    unscored), as mimir and the Min-K%++ code score WikiMIA/MIMIR; add_eos=True appends the EOS (kdfast's
    former behaviour). An instruction record keeps the study's template and its response's EOS (the teacher
    was trained on it). A record over max_len keeps its first max_len tokens; a prompt that leaves no room
    for a response token keeps its end instead, next to the response marker (as TRL truncates prompts).
    numbers: each record's position in the caller's list, for error messages.
    """
    numbers = numbers if numbers is not None else range(len(records))
    items = [encode_text(tokenizer, r["text"], max_len, add_eos, f"record {i}") if "text" in r
             else encode(tokenizer, r, max_len=max_len, where=f"record {i}", long_prompt="truncate")
             for i, r in zip(numbers, records)]
    if not response_only:
        items = [Encoded(it.input_ids, list(it.input_ids), 0) for it in items]
    return items


def records_cut(tokenizer, records: list[dict], max_len: int | None, add_eos: bool = False) -> int:
    """How many records encode_scored cuts to max_len (0 when max_len is None)."""
    if max_len is None:
        return 0
    return sum(len(it) > max_len for it in encode_scored(tokenizer, records, add_eos=add_eos))


def encode_text(tokenizer, text: str, max_len: int | None = None, add_eos: bool = False,
                where: str = "record") -> Encoded:
    """`tokenizer(text)` as it is (+ EOS with add_eos), cut to max_len; every token scored but the first."""
    ids = tokenizer(text)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_len]
    if not ids:
        raise RecordError(f"{where}: the text tokenizes to nothing; remove the record")
    return Encoded(ids, [IGNORE_INDEX] + ids[1:], 0)


def scored_text(record: dict, response_only: bool = True) -> str:
    """The text whose tokens are scored: the response (or a {"text"} record's text), or prompt + response."""
    return target_text(record) if response_only else prompt_text(record) + target_text(record)


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (the true text, not the model's argmax text)."""
    return len(zlib.compress(text.encode("utf-8")))


def lowercased(record: dict, response_only: bool = True) -> dict:
    """The record with its scored text lower-cased (the prompt template itself is left as it is)."""
    fields = ("text", "response") if response_only else ("text", "instruction", "input", "response")
    return {k: v.lower() if k in fields else v for k, v in record.items()}


def linear_head(model: nn.Module) -> nn.Module | None:
    """The model's output head module when logits are a plain linear map of the last hidden state, else None."""
    try:
        output_head(model)
    except ModelError:
        return None
    return model.get_output_embeddings()


def forward_stats(model: nn.Module, batch: dict[str, torch.Tensor], fused: bool | None = None,
                  head: nn.Module | None = None, share_prefix: bool | None = None) -> BatchStats:
    """One forward pass of a padded batch (pad_batch's dict) -> per-token statistics of its scored tokens.

    With a plain linear head, only the hidden states of scored positions go through the head. fused=None
    picks the path by size: logits of at most LOGITS_LIMIT elements are materialized and passed to
    token_stats; larger ones use token_stats_from_hidden. fused=False always calls the head module
    (so its forward hooks run: MoPe relies on that). share_prefix: the unscored token prefix that every row
    shares (the prompt template's header, with right padding) runs once and its KV cache serves the whole
    batch; None shares it on the CPU only (1.7x faster there; 1.6x slower on an H200, where recomputing the
    prefix costs less than handling the cache: benchmarks/results/attacks-*.md). Call under no_grad.
    """
    device = model_device(model)
    share_prefix = device.type == "cpu" if share_prefix is None else share_prefix
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    # A left-padded row's last pad position would otherwise "predict" its first token.
    targets = next_token_targets(batch["labels"]).masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX).to(device)
    valid = targets != IGNORE_INDEX
    head = head if head is not None else linear_head(model)
    if head is None:
        stats = token_stats(model(**inputs, use_cache=False).logits, targets)
        return BatchStats(stats.logp, stats.mu, stats.sigma, valid)
    cut = shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], valid) if share_prefix else 0
    hidden, (weight, bias) = _hidden_after(model, inputs, cut)
    rows = _head_stats(head, weight, bias, hidden[valid[:, cut:]], targets[valid], fused)
    out = [torch.zeros(valid.shape, dtype=torch.float32, device=device) for _ in rows]
    for full, part in zip(out, rows):
        full[valid] = part
    return BatchStats(*out, valid)


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, valid: torch.Tensor) -> int:
    """Leading columns where every row holds the same real token and no position is scored (0 for one row)."""
    if input_ids.shape[0] < 2:
        return 0
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(0) & ~valid.any(0)
    return int(same.int().cumprod(0).sum())


def _hidden_after(model: nn.Module, inputs: dict[str, torch.Tensor], cut: int):
    """hidden_and_head of columns cut: onward; columns :cut (the same in every row) run once, as a KV cache."""
    if cut == 0:
        return hidden_and_head(model, **inputs, use_cache=False)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # transformers ≥ 5.2x names the argument `cache` (past_key_values is deprecated); older 5.x only knows
    # past_key_values.
    name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    hidden_and_head(model, inputs["input_ids"][:1, :cut], inputs["attention_mask"][:1, :cut],
                    position_ids=inputs["position_ids"][:1, :cut], use_cache=True, **{name: cache})
    cache.batch_repeat_interleave(inputs["input_ids"].shape[0])
    return hidden_and_head(model, inputs["input_ids"][:, cut:], inputs["attention_mask"],
                           position_ids=inputs["position_ids"][:, cut:], use_cache=True, **{name: cache})


def _head_stats(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor,
                targets: torch.Tensor, fused: bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, mu, sigma) [N] fp32 of hidden rows [N, H] under the head."""
    vocab = weight.shape[0]
    if fused is None:
        fused = hidden.shape[0] * vocab > LOGITS_LIMIT
    if fused:
        s = token_stats_from_hidden(hidden, weight, targets, bias=bias)
        return s.logp, s.mu, s.sigma
    chunk = max(1, LOGITS_LIMIT // vocab)
    parts = [token_stats(head(h), t) for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    return tuple(torch.cat([getattr(p, f).float() for p in parts]) for f in ("logp", "mu", "sigma"))


def logit_scores(stats: BatchStats, ks: tuple[float, ...]) -> dict[str, np.ndarray]:
    """loss (mean ℓ_t), min_k@k (mean of the lowest k of ℓ_t) and min_k_pp@k (of (ℓ_t − μ_t)/σ_t), each [B]."""
    z = torch.where(stats.valid, (stats.logp - stats.mu) / stats.sigma.clamp_min(SIGMA_FLOOR), 0.0)
    low = min_k(stats.logp, stats.valid, ks).double().cpu().numpy()
    low_pp = min_k(z, stats.valid, ks).double().cpu().numpy()
    empty = stats.n_tokens() == 0
    out = {"loss": stats.mean_ll()}
    for j, k in enumerate(ks):
        out[f"min_k@{k:g}"] = np.where(empty, np.nan, low[:, j])
        out[f"min_k_pp@{k:g}"] = np.where(empty, np.nan, low_pp[:, j])
    return out


def mean_log_likelihoods(model: nn.Module, items: list[Encoded], pad_id: int, batch_tokens: int = 8192,
                         padding_side: str = "right", fused: bool | None = None,
                         autocast: bool | None = None) -> np.ndarray:
    """Mean ℓ_t of each item's scored tokens (float64 [len(items)]), batched by length under the token budget."""
    out = np.full(len(items), np.nan)
    head = linear_head(model)
    with inference_context(model_device(model), autocast):
        for idx in token_budget_batches([len(it) for it in items], batch_tokens):
            batch = pad_batch([items[i] for i in idx], pad_id, padding_side)
            out[idx] = forward_stats(model, batch, fused, head).mean_ll()
    return out
