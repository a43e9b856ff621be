"""The losses at the valid target positions: divergence to the teacher, cross-entropy and per-token log-probs.

Both paths call kdfast's ops (no divergence is re-implemented here): the fused-linear path feeds hidden states and
the output heads to kdfast.fused_linear_distill_loss (no [N, V] logits kept), the logits path feeds materialized
logits to kdfast.distill_loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdfast.data import IGNORE_INDEX
from kdfast.models import hidden_and_head
from kdfast.ops.divergence import distill_loss
from kdfast.ops.fused_linear import fused_linear_distill_loss
from kdfast.runtime import TOKEN_NLL_CHUNK_ELEMENTS


@dataclass
class Rows:
    """A model's outputs at the N valid target positions of a batch (row-major order).

    values: hidden states [N, H] with head = (weight [V, H], bias [V] or None), or logits [N, V] with head None.
    """

    values: torch.Tensor
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None


def valid(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] bool: positions whose next-token target is a label."""
    return batch["targets"] != IGNORE_INDEX


def forward_rows(model: nn.Module, batch: dict[str, torch.Tensor], fused: bool) -> Rows:
    """Run `model` on a collated batch and keep its outputs at the valid target positions."""
    keep = valid(batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if fused:
        hidden, head = hidden_and_head(model, inputs.pop("input_ids"), inputs.pop("attention_mask"), **inputs)
        return Rows(hidden[keep], head)
    return Rows(model(**inputs, use_cache=False).logits[keep])


def divergence_sum(student: Rows, teacher: Rows | None, targets: torch.Tensor, *, kind: str, soft_weight: float,
                   hard_weight: float, beta: float, alpha: float, temperature: float, vocab: str,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Σ over the N rows of soft_weight·divergence(teacher ‖ student) + hard_weight·CE(targets); targets [N] long.

    teacher may be None when soft_weight == 0 (plain cross-entropy).
    """
    n = targets.numel()
    if n == 0:
        return student.values.sum() * 0.0
    if soft_weight == 0 or teacher is None:
        return hard_weight * token_nll(student, targets).sum() if hard_weight else student.values.sum() * 0.0
    if student.head is not None:
        dtype = _compute_dtype(student.values, student.head[0])
        hs = student.values.to(dtype)
        # an fp32 master head goes in as it is: the op casts it once and returns its gradient in fp32
        ws, bs = student.head if student.head[0].dtype == torch.float32 else _same_dtype(hs, *student.head, dtype)[1:]
        ht, wt, bt = _same_dtype(teacher.values, *teacher.head, teacher.head[0].dtype)
        return fused_linear_distill_loss(
            hs, ws, ht, wt, labels=targets, kind=kind, beta=beta, alpha=alpha, temperature=temperature,
            hard_weight=hard_weight, soft_weight=soft_weight, student_bias=bs, teacher_bias=bt, vocab=vocab,
            chunk_size=chunk_size, reduction="sum")
    total = soft_weight * distill_loss(student.values, teacher.values, kind, beta=beta, alpha=alpha,
                                       temperature=temperature, labels=targets, reduction="sum", vocab=vocab)
    if hard_weight:
        total = total + hard_weight * F.cross_entropy(student.values.float(), targets, reduction="sum")
    return total


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (what a matmul would run in), else the weight's dtype."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _same_dtype(hidden, weight, bias, dtype):
    """The fused op wants hidden, weight and bias of one model in one dtype; casts keep the gradient path."""
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def token_nll(rows: Rows, targets: torch.Tensor) -> torch.Tensor:
    """−log q(target) per row [N] fp32, differentiable; from hidden states in checkpointed chunks (no [N, V] kept)."""
    if rows.head is None:
        return F.cross_entropy(rows.values.float(), targets, reduction="none")
    weight, bias = rows.head
    step = max(16, TOKEN_NLL_CHUNK_ELEMENTS // weight.shape[0])
    parts = []
    for start in range(0, targets.numel(), step):
        h, t = rows.values[start: start + step], targets[start: start + step]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_nll, h, weight, bias, t, use_reentrant=False))
        else:
            parts.append(_chunk_nll(h, weight, bias, t))
    return torch.cat(parts) if parts else rows.values.new_zeros(0, dtype=torch.float32)


def _chunk_nll(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    return F.cross_entropy(logits.float(), targets, reduction="none")
