"""Training data of the trainer: validated, encoded records, padded micro-batches and a resumable, sharded order."""
from __future__ import annotations

import random
import warnings

import torch

from kdfast.data import IGNORE_INDEX, Encoded, RecordError, encode_all, next_token_targets, normalize, pad_batch
from kdfast.distill.config import DistillError


def encode_training(tokenizer, records: list[dict], max_len: int, max_prompt_len: int | None,
                    long_prompts: str = "error", what: str = "training") -> list[Encoded]:
    """Instruction records -> Encoded (prompt labels masked, EOS appended); bad records raise RecordError.

    long_prompts: "error" raises on a prompt over max_prompt_len, "truncate" keeps its end, "drop" skips the
    record; truncated or dropped records are counted in a warning.
    """
    if not records:
        raise DistillError(f"no {what} records given")
    normalized = [normalize(r, where=getattr(r, "where", f"{what} record {i}")) for i, r in enumerate(records)]
    texts = [i for i, r in enumerate(normalized) if "text" in r]
    if texts:
        raise RecordError(f"{what} record {texts[0]} is a {{'text'}} record; {what} records need 'instruction' and "
                          "'response' (plain text goes in lm_records)")
    encoded, kept = encode_all(tokenizer, normalized, max_len, max_prompt_len, long_prompts=long_prompts)
    if not encoded:
        raise RecordError(f"every {what} record has a prompt longer than max_prompt_len={max_prompt_len} / "
                          f"max_len={max_len}; raise them (kdfast distill --max-prompt-len/--max-len, the audit's "
                          "data.max_prompt_len/data.max_len)")
    limits = f"max_prompt_len={max_prompt_len} or leaves no room under max_len={max_len}"
    if len(kept) < len(normalized):
        warnings.warn(f"dropped {len(normalized) - len(kept)} of {len(normalized)} {what} records whose prompt exceeds "
                      f"{limits}", stacklevel=3)
    cut = sum(e.truncated for e in encoded)
    if cut:
        warnings.warn(f"truncated the prompt of {cut} of {len(normalized)} {what} records (kept its end) as it exceeds "
                      f"{limits}", stacklevel=3)
    return encoded


def encode_texts(tokenizer, records: list[dict], max_len: int) -> list[Encoded]:
    """{"text"} records (pretraining text) -> Encoded with every token a label, cut to max_len."""
    normalized = [normalize(r, where=f"lm record {i}") for i, r in enumerate(records)]
    bad = [i for i, r in enumerate(normalized) if "text" not in r]
    if bad:
        raise RecordError(f"lm record {bad[0]} has no 'text' field; lm_records hold plain text: {{\"text\": ...}}")
    encoded, _ = encode_all(tokenizer, normalized, max_len)
    return encoded


def with_response(example: Encoded, response: list[int], max_len: int) -> Encoded:
    """The example's prompt followed by a new response (generated), cut to max_len; prompt labels masked."""
    prompt = example.input_ids[: example.prompt_len]
    response = response[: max_len - len(prompt)]
    return Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response, len(prompt))


def prompt_of(example: Encoded) -> list[int]:
    return example.input_ids[: example.prompt_len]


def collate(items: list[Encoded], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded tensors on `device`: input_ids, attention_mask, position_ids [B, L] and the next-token
    targets [B, L] (position t predicts token t + 1; prompt and padding are IGNORE_INDEX)."""
    batch = pad_batch(items, pad_id, side="right")
    out = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    out["targets"] = next_token_targets(batch["labels"]).to(device)
    return out


def count_targets(items: list[Encoded]) -> int:
    """Valid next-token targets of a micro-batch: every label but the first position's (it predicts nothing)."""
    return sum(sum(1 for y in it.labels[1:] if y != IGNORE_INDEX) for it in items)


class DataStream:
    """A seeded, per-epoch shuffled order over n records, cut into this process's share of each global chunk.

    take(k) gives k indices to process `rank` of `world`; all processes together consume k × world records of the
    same permutation, so any split of a global batch over processes and micro-batches sees the same records.
    An epoch ends when fewer than k × world records remain (they are skipped, as drop_last does).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._perm: tuple[int, list[int]] | None = None

    def _order(self) -> list[int]:
        if self._perm is None or self._perm[0] != self.epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._perm = (self.epoch, order)
        return self._perm[1]

    def take(self, k: int) -> list[int]:
        if k * self.world > self.n:
            raise DistillError(f"{self.n} training records cannot fill a batch of {k} per process × {self.world} "
                               "processes; lower batch_size or give more records")
        if self.pos + k * self.world > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        start = self.pos + self.rank * k
        self.pos += k * self.world
        return self._order()[start: start + k]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
