"""Tokenized records: prompt tokens masked from the labels, batches padded left or right under a token budget."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.data.records import RecordError
from kdfast.data.template import prompt_text, target_text

IGNORE_INDEX = -100


LONG_PROMPTS = ("truncate", "drop", "error")  # what to do with a prompt over max_prompt_len (or max_len - 1)


@dataclass
class Encoded:
    """One record's tokens: input_ids [L]; labels [L] aligned with them (prompt positions IGNORE_INDEX)."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool = False  # the prompt's beginning was cut (long_prompts="truncate")

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, record: dict, max_len: int | None = None, max_prompt_len: int | None = None,
           add_eos: bool = True, where: str = "record", long_prompt: str = "error") -> Encoded:
    """Tokenize a record: the prompt (with the tokenizer's special tokens) then the target text (+ EOS).

    The response is cut to fit max_len. A prompt longer than max_prompt_len (or leaving no room for a response
    under max_len) raises RecordError, or with long_prompt="truncate" keeps its end, next to the response marker
    (a leading BOS stays), as TRL truncates prompts.
    """
    prompt = prompt_text(record)
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else _bos(tokenizer)
    target_ids = tokenizer(target_text(record), add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    if not target_ids:
        raise RecordError(f"{where}: the response tokenizes to nothing; remove the record")
    limit = min(max_prompt_len or len(prompt_ids), max_len - 1 if max_len else len(prompt_ids))
    truncated = len(prompt_ids) > limit
    if truncated and long_prompt == "truncate" and prompt:
        head = prompt_ids[:1] if prompt_ids[:1] == _bos(tokenizer) else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (limit - len(head)):]
    elif truncated:
        over = (f"> max_prompt_len={max_prompt_len}" if max_prompt_len and len(prompt_ids) > max_prompt_len
                else f"leaving no room for the response under max_len={max_len}")
        raise RecordError(f"{where}: prompt has {len(prompt_ids)} tokens {over}; raise the limit (kdfast distill "
                          "--max-prompt-len/--max-len, the audit's data.max_prompt_len/data.max_len), or set "
                          "long_prompts to truncate (keep the prompt's end) or drop "
                          "(--long-prompts, data.long_prompts)")
    if max_len is not None:
        target_ids = target_ids[: max_len - len(prompt_ids)]
    ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    # The first token of a sequence has no context to be predicted from; labelling it would let a left pad
    # position "predict" it after next_token_targets' shift.
    labels[0] = IGNORE_INDEX
    return Encoded(ids, labels, len(prompt_ids), truncated and long_prompt == "truncate")


def _bos(tokenizer) -> list[int]:
    return ([tokenizer.bos_token_id]
            if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else [])


def encode_all(tokenizer, records: list[dict], max_len: int | None = None, max_prompt_len: int | None = None,
               long_prompts: str = "error", add_eos: bool = True) -> tuple[list[Encoded], list[int]]:
    """Encode many records; returns (encoded, indices of the records kept). long_prompts: see LONG_PROMPTS
    ("drop" skips the records a long prompt would raise for). Errors name the record's file and line when it
    was read from one (Record.where), else its position."""
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts={long_prompts!r}: choose one of {', '.join(LONG_PROMPTS)}")
    out, kept = [], []
    policy = "error" if long_prompts == "drop" else long_prompts
    for i, record in enumerate(records):
        try:
            out.append(encode(tokenizer, record, max_len, max_prompt_len, add_eos,
                              getattr(record, "where", f"record {i}"), policy))
            kept.append(i)
        except RecordError:
            if long_prompts != "drop":
                raise
    return out, kept


def pad_batch(items: list[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Stack into input_ids, attention_mask, labels [B, L] and position_ids that ignore the padding.

    Position ids count real tokens only, so a record gets the same positions under left or right padding.
    """
    if side not in ("left", "right"):
        raise ValueError(f"unknown padding side {side!r}; choose 'left' or 'right'")
    width = max(len(it) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        cols = slice(width - len(it), width) if side == "left" else slice(0, len(it))
        ids[b, cols] = torch.tensor(it.input_ids)
        labels[b, cols] = torch.tensor(it.labels)
        mask[b, cols] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits: position t predicts labels[t + 1]; the last position is ignored.

    labels [B, L] -> [B, L] long.
    """
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def token_budget_batches(lengths: list[int], batch_tokens: int, max_batch: int | None = None) -> list[list[int]]:
    """Index batches sorted by length whose padded size (count × longest) stays within batch_tokens.

    A record longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        grown = max(longest, lengths[i])
        if current and (grown * (len(current) + 1) > batch_tokens or (max_batch and len(current) >= max_batch)):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches
