"""Utility of a model on held-out prompts: ROUGE-L F1 of its greedy responses, as MiniLLM and DistiLLM report it."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from torch import nn

from kdfast.generation import eval_mode, generate, pad_token_id
from kdfast.memorization import fit_prompts
from kdfast.models import context_len


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one response: rouge_score's RougeScorer(["rougeL"], use_stemmer=True), the field's setting."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    """The mean ROUGE-L F1 over paired responses (the utility number of a model)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"mean_rouge_l needs as many predictions as references, at least one; got "
                         f"{len(predictions)} and {len(references)}")
    return float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references)]))


def greedy_responses(model: nn.Module, tokenizer, records: list[dict], n_tokens: int, batch_size: int = 32,
                     progress: bool = False) -> list[str]:
    """Decoded greedy responses (at most n_tokens tokens, cut after EOS) to each instruction record's prompt (its
    end, where the prompt and n_tokens exceed the model's positions)."""
    prompts = [e.input_ids[: e.prompt_len] for e in fit_prompts(tokenizer, records, context_len(model, None), n_tokens)]
    with eval_mode(model):
        ids = generate(model, prompts, n_tokens, pad_id=pad_token_id(tokenizer), eos_id=tokenizer.eos_token_id,
                       batch_size=batch_size, progress=progress, desc="utility")
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
