"""Greedy decoding in length-sorted chunks with a progress bar, the model held in eval mode meanwhile."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from tqdm.auto import tqdm

from kdfast.generation import generate


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off while measuring (greedy outputs must be deterministic); the caller's mode comes back after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def greedy(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, pad_id: int, eos_id: int | None,
           batch_size: int, progress: bool, desc: str) -> list[list[int]]:
    """kdfast.generation.generate (greedy, KV cache, left padding) over chunks of similar-length prompts.

    Chunking in length order keeps generate's own batches (one per chunk) as tight as one call would.
    """
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[list[int]] = [[] for _ in prompts]
    with eval_mode(model), tqdm(total=len(prompts), desc=desc, unit="rec", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            new = generate(model, [prompts[i] for i in chunk], max_new_tokens, pad_id=pad_id, eos_id=eos_id,
                           batch_size=batch_size)
            for i, tokens in zip(chunk, new):
                out[i] = tokens
            bar.update(len(chunk))
    return out
