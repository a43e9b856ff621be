"""Batched generation with the KV cache: prompts left-padded by length, outputs cut after the first EOS."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from kdfast.data import Encoded, pad_batch, token_budget_batches


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Dropout off in every model meanwhile (greedy outputs and scores must be deterministic); each model's own
    mode comes back after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def pad_token_id(tokenizer) -> int | None:
    """The id that fills left-padded prompts: the tokenizer's pad token, else its EOS (GPT-2 has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, pad_id: int, eos_id: int | None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             batch_size: int = 32, seed: int | None = None, progress: bool = False,
             desc: str = "generate") -> list[list[int]]:
    """New tokens for each prompt (token-id lists), up to and including the first EOS (eos_id=None: all steps).

    Greedy by default; sampling with temperature / top-k (0 = off) / top-p, seeded when `seed` is given.
    A prompt's output does not depend on the batch it lands in (position ids skip the padding). The model runs
    as it is (train or eval mode); wrap the call in eval_mode() to turn dropout off.
    """
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    batches = token_budget_batches([len(p) for p in prompts], batch_tokens=10**12, max_batch=batch_size)
    bar = tqdm(total=len(prompts), desc=desc, unit="rec", disable=not progress)
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for idx in batches:
            batch = pad_batch([Encoded(prompts[i], prompts[i], 0) for i in idx], pad_id, side="left")
            ids = batch["input_ids"].to(device)
            new = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_k=top_k if do_sample else None,
                                 top_p=top_p if do_sample else None, pad_token_id=pad_id, eos_token_id=eos_id,
                                 use_cache=True)[:, ids.shape[1]:]
            for row, i in enumerate(idx):
                out[i] = _cut_after_eos(new[row].tolist(), eos_id)
            bar.update(len(idx))
    return out


def _cut_after_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens
