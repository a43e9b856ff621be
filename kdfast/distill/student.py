"""make_student: a smaller model of the teacher's family built from chosen teacher blocks."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from kdfast.models import transformer_blocks

INIT_RULES = ("evenly", "low_risk", "high_risk")


def make_student(teacher: nn.Module, layers: Sequence[int] | str | None = None, *, num_layers: int | None = None,
                 risk: Mapping[int, float] | Sequence[float] | None = None,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `teacher` keeping only the blocks `layers` (in that order), re-indexed 0..k−1.

    Embeddings, final norm and output head are copied; config.num_hidden_layers (and layer_types, where the config
    has it) follow. Give either `layers` (negative indices count from the end) or `num_layers`
    (evenly spaced blocks, first and last included), or a rule of INIT_RULES with `num_layers` (see
    choose_blocks: "low_risk" keeps the blocks of lowest `risk`, e.g. the teacher's per-block MoPe AUC). Works for
    GPT-2, OPT, LLaMA and any HF causal LM whose blocks kdfast.models.transformer_blocks finds; the teacher is
    left untouched and only the kept blocks are copied.
    """
    blocks = transformer_blocks(teacher)
    total = len(blocks)
    if isinstance(layers, str):
        chosen = choose_blocks(total, layers, num_layers, risk)
    else:
        chosen = _choose(total, layers, num_layers)
    parent, attr = _owner(teacher, blocks)
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in chosen]))
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, attr, blocks)
    for new_index, block in enumerate(transformer_blocks(student)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    _shrink_config(student.config, chosen, total)
    student.config._name_or_path = ""  # a new model: the teacher's name would mislead (a LoRA adapter's base)
    student.requires_grad_(True)
    if dtype is not None:
        student = student.to(dtype)
    return student


def choose_blocks(total: int, rule: str, num_layers: int | None,
                  risk: Mapping[int, float] | Sequence[float] | None = None) -> list[int]:
    """`num_layers` teacher block indices (ascending) by `rule`: "evenly" spaced (first and last included),
    "low_risk" / "high_risk": the blocks of lowest / highest `risk` (one value per teacher block, as a sequence or
    a {block index: value} mapping, e.g. per-block MoPe AUC; ties go to the earlier block)."""
    if rule not in INIT_RULES:
        raise ValueError(f"unknown block rule {rule!r}; choose from {', '.join(INIT_RULES)}")
    if num_layers is None:
        raise ValueError(f"layers={rule!r} needs num_layers=k, the student's block count")
    if rule == "evenly":
        return _choose(total, None, num_layers)
    if risk is None:
        raise ValueError(f"layers={rule!r} needs risk=, one value per teacher block (e.g. per-block MoPe AUC)")
    values = {int(k): float(v) for k, v in (risk.items() if isinstance(risk, Mapping) else enumerate(risk))}
    if sorted(values) != list(range(total)):
        raise ValueError(f"risk gives blocks {sorted(values)}; the teacher has {total} blocks (0..{total - 1}), "
                         "give one value for each")
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must lie in [1, {total}] (the teacher has {total} blocks), got {num_layers}")
    sign = 1.0 if rule == "low_risk" else -1.0
    return sorted(sorted(range(total), key=lambda i: (sign * values[i], i))[:num_layers])


def _choose(total: int, layers: Sequence[int] | None, num_layers: int | None) -> list[int]:
    if (layers is None) == (num_layers is None):
        raise ValueError("give exactly one of layers=[...] (teacher block indices) or num_layers=k")
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must lie in [1, {total}] (the teacher has {total} blocks), got {num_layers}")
        if num_layers == 1:
            return [0]
        return sorted({round(i * (total - 1) / (num_layers - 1)) for i in range(num_layers)})
    chosen = []
    for i in layers:
        if not -total <= int(i) < total:
            raise ValueError(f"layer {i} is out of range: the teacher has {total} blocks (0..{total - 1})")
        chosen.append(int(i) % total)
    if not chosen:
        raise ValueError("layers is empty; keep at least one teacher block")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {list(layers)} repeat a block; each kept block must be distinct")
    return chosen


def _owner(model: nn.Module, blocks: nn.ModuleList) -> tuple[nn.Module, str]:
    """The module holding `blocks` and its attribute name."""
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if child is blocks:
                return module, attr
    raise ValueError(f"cannot locate the block list of {type(model).__name__}")


def _shrink_config(config, chosen: list[int], total: int) -> None:
    config.num_hidden_layers = len(chosen)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        config.layer_types = [layer_types[i] for i in chosen]
