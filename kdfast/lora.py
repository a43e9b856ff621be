"""LoRA (Hu et al., 2021) for the trainer: low-rank adapters on chosen linear layers, merged back on save.

Written here rather than taken from peft to keep the dependency list short; it needs only wrap, merge and a
state-dict merge that also works on a state gathered by accelerate (FSDP).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DEFAULT_TARGETS = "q_proj,v_proj,c_attn"  # attention projections of LLaMA/OPT/Mistral and GPT-2's fused QKV


class LoRALinear(nn.Module):
    """base(x) + scaling · x Aᵀ Bᵀ with the base frozen; A [r, in] Kaiming-uniform, B [out, r] zero (so the
    wrapped layer starts equal to the base). Works for nn.Linear ([out, in] weight) and GPT-2's Conv1D ([in, out])."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        transposed = isinstance(base, Conv1D)
        fan_in, fan_out = base.weight.shape[::-1] if not transposed else base.weight.shape
        self.base, self.transposed, self.scaling = base, transposed, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, fan_in, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(fan_out, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = nn.functional.linear(nn.functional.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return out + (delta * self.scaling).to(out.dtype)

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """scaling · B A of adapters a [r, in], b [out, r] (this layer's or a state dict's), fp32, in the base
        weight's layout."""
        delta = (b.float() @ a.float()) * self.scaling
        return delta.T if self.transposed else delta


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Freeze `model` and wrap every linear layer whose name ends with one of `targets` (comma-separated) in a
    LoRALinear of `rank` (scaling alpha / rank; alpha None: rank). Returns the wrapped module names."""
    if rank < 1:
        raise ValueError(f"lora rank must be at least 1, got {rank}")
    suffixes = tuple(t.strip() for t in targets.split(",") if t.strip())
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name.endswith(suffixes) or isinstance(module, LoRALinear):
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer; "
                             "choose other lora_targets")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, float(alpha or rank)))
        wrapped.append(name)
    if not wrapped:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
        raise ValueError(f"no module of {type(model).__name__} matches lora_targets={targets!r}; "
                         f"its linear layers are named {', '.join(linears)}")
    return wrapped


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (model's state dict, or one gathered from it) with every LoRALinear folded into a plain weight:
    the keys and values of the model before apply_lora, with the adapters' deltas added."""
    state = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        delta = module.delta(state.pop(f"{name}.lora_a"), state.pop(f"{name}.lora_b"))
        weight = state.pop(f"{name}.base.weight")
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
        if f"{name}.base.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the base layers back (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                module.base.weight += module.delta(module.lora_a, module.lora_b).to(module.base.weight.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
    return model
