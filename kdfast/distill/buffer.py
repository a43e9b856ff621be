"""Replay buffer of generated sequences (ImitKD, DistiLLM): first in, first out, saved in checkpoints."""
from __future__ import annotations

import random
from collections import deque

import torch

from kdfast.data import Encoded


class ReplayBuffer:
    """Holds up to `capacity` Encoded sequences; the oldest leave first; sample() draws without replacement."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: deque[Encoded] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def push(self, items: list[Encoded]) -> None:
        self.items.extend(items)

    def sample(self, k: int, rng: random.Random) -> list[Encoded]:
        """k distinct sequences (all of them when fewer are held)."""
        return rng.sample(list(self.items), k=min(k, len(self.items)))

    def state_tensors(self, prefix: str = "buffer") -> dict[str, torch.Tensor]:
        return pack_sequences(list(self.items), prefix)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "buffer") -> None:
        self.items.clear()
        self.items.extend(unpack_sequences(tensors, prefix))


def pack_sequences(items: list[Encoded], prefix: str) -> dict[str, torch.Tensor]:
    """Sequences as flat int64 tensors (for safetensors): ids and labels concatenated, lengths, prompt lengths."""
    cat = lambda seqs: torch.tensor([x for seq in seqs for x in seq], dtype=torch.long)  # noqa: E731
    return {f"{prefix}.ids": cat(it.input_ids for it in items), f"{prefix}.labels": cat(it.labels for it in items),
            f"{prefix}.lengths": torch.tensor([len(it) for it in items], dtype=torch.long),
            f"{prefix}.prompt_lens": torch.tensor([it.prompt_len for it in items], dtype=torch.long)}


def unpack_sequences(tensors: dict[str, torch.Tensor], prefix: str) -> list[Encoded]:
    """The inverse of pack_sequences."""
    ids, labels = tensors[f"{prefix}.ids"].tolist(), tensors[f"{prefix}.labels"].tolist()
    out, start = [], 0
    for n, p in zip(tensors[f"{prefix}.lengths"].tolist(), tensors[f"{prefix}.prompt_lens"].tolist()):
        out.append(Encoded(ids[start: start + n], labels[start: start + n], p))
        start += n
    return out
