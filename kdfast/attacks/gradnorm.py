"""GradNorm (as in mimir): −‖∇_θ L(x)‖₂ per record; members sit where the loss is flat, so their gradients are small."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kdfast.attacks.bulk import linear_head
from kdfast.data import IGNORE_INDEX, Encoded, next_token_targets
from kdfast.models import hidden_and_head, model_device


def record_loss(model: nn.Module, item: Encoded, head: nn.Module | None = None) -> torch.Tensor:
    """Mean NLL of one record's scored tokens with autograd (only scored rows go through a linear head)."""
    device = model_device(model)
    ids = torch.tensor([item.input_ids], device=device)
    targets = next_token_targets(torch.tensor([item.labels], device=device))[0]
    valid = targets != IGNORE_INDEX
    if head is None:
        logits = model(input_ids=ids, use_cache=False).logits[0, valid]
    else:
        hidden, _ = hidden_and_head(model, ids, use_cache=False)
        logits = head(hidden[0, valid])
    return F.cross_entropy(logits.float(), targets[valid])


def gradnorm_scores(model: nn.Module, items: list[Encoded], autocast: bool | None = None,
                    progress: bool = False) -> np.ndarray:
    """−‖∇_θ L‖₂ over all parameters (tied ones once), one backward per record; float64 [len(items)].

    Gradients come from torch.autograd.grad, so no .grad is written; requires_grad flags are restored.
    autocast=None: bf16 on a GPU.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    device = model_device(model)
    use_autocast = autocast if autocast is not None else device.type == "cuda"
    head = linear_head(model)
    out = np.empty(len(items))
    try:
        for p in params:
            p.requires_grad_(True)
        for i, item in enumerate(tqdm(items, desc="gradnorm", disable=not progress, leave=False)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = record_loss(model, item, head)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out[i] = -torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None)).item()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return out
