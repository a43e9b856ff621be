"""MiniLLM's rollouts: sample each next token from (1 − α)·q + α·p, stepping student q and teacher p together with
their KV caches (stock `generate` cannot mix two models)."""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from kdfast.data import Encoded, pad_batch, token_budget_batches


@torch.no_grad()
def sample_mixture(student: nn.Module, teacher: nn.Module, prompts: list[list[int]], max_new_tokens: int, *,
                   alpha: float, pad_id: int, eos_id: int | None, temperature: float = 1.0, do_sample: bool = True,
                   batch_size: int = 16, seed: int | None = None) -> list[list[int]]:
    """New tokens for each prompt, up to and including the first EOS, drawn from the mixture of the two models'
    next-token distributions (each at `temperature`). alpha=0 samples the student, alpha=1 the teacher;
    do_sample=False takes the mixture's argmax. Prompts are left-padded in batches of similar length; the
    teacher runs on its own device. The vocabulary is the common prefix of the two heads.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    device = next(student.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    for idx in token_budget_batches([len(p) for p in prompts], batch_tokens=10**12, max_batch=batch_size):
        batch = pad_batch([Encoded(prompts[i], prompts[i], 0) for i in idx], pad_id, side="left")
        sampled = _sample_batch(student, teacher, batch, max_new_tokens, alpha=alpha, eos_id=eos_id, pad_id=pad_id,
                                temperature=temperature, do_sample=do_sample, generator=generator)
        for sequence, i in zip(sampled, idx):
            out[i] = sequence
    return out


def _sample_batch(student, teacher, batch, max_new_tokens, *, alpha, eos_id, pad_id, temperature, do_sample,
                  generator) -> list[list[int]]:
    device = next(student.parameters()).device
    ids, mask, pos = (batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids"))
    steppers = [_Stepper(student, device), _Stepper(teacher, device)]
    logits = [s(ids, mask, pos) for s in steppers]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        log_mix = _log_mixture(logits[0], logits[1], alpha, temperature)
        if do_sample:
            nxt = torch.multinomial(log_mix.exp(), 1, generator=generator).squeeze(1)
        else:
            nxt = log_mix.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, (~done).long().unsqueeze(1)], dim=1)
        pos = pos[:, -1:] + 1
        logits = [s(nxt.unsqueeze(1), mask, pos) for s in steppers]
    new = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(ids.shape[0])]
    return [_cut_after_eos(row, eos_id, max_new_tokens) for row in new]


def _log_mixture(student_logits, teacher_logits, alpha, temperature):
    """log((1 − α)·softmax(q/T) + α·softmax(p/T)) over the common vocabulary, in log space."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = torch.log_softmax(student_logits[:, :v].float() / temperature, dim=-1)
    if alpha == 0.0:
        return log_q
    log_p = torch.log_softmax(teacher_logits[:, :v].float() / temperature, dim=-1)
    if alpha == 1.0:
        return log_p
    return torch.logaddexp(log_q + math.log1p(-alpha), log_p + math.log(alpha))


class _Stepper:
    """Incremental decoding of one model with its KV cache; returns next-token logits [B, V] on `out_device`."""

    def __init__(self, model: nn.Module, out_device: torch.device):
        self.model, self.out_device = model, out_device
        self.device = next(model.parameters()).device
        # transformers renamed past_key_values to cache (5.2x); accept either.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = None

    def __call__(self, ids, mask, pos):
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, **{self.cache_arg: self.cache})
        self.cache = out.get("cache", None) if "cache" in out else out.get("past_key_values", None)
        return out.logits[:, -1].to(self.out_device)


def _cut_after_eos(tokens: list[int], eos_id: int | None, limit: int) -> list[int]:
    tokens = tokens[:limit]
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens
