"""LoRA (Hu et al., 2021) for the trainer through peft: adapters injected in place on chosen linear layers (also on
an NF4 base, QLoRA), folded into plain weights on save and written in peft's adapter format beside them."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from kdfast.models import ADAPTER_WEIGHTS, dequantized_state_dict, import_peft, local_path

DEFAULT_TARGETS = "q_proj,v_proj,c_attn"  # attention projections of LLaMA/OPT/Mistral and GPT-2's fused QKV
ADAPTER = "default"  # peft's adapter name: the one adapter kdfast trains
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the model's own parameter names


def _targets(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Freeze `model` and inject (in place, peft's inject_adapter_in_model) a LoRA adapter of `rank` (scaling
    alpha / rank; alpha None: rank) into every linear layer whose name ends with one of `targets` (comma-separated
    module names). The adapters start as the identity (B = 0) and train in fp32. Returns the wrapped module names.
    """
    if rank < 1:
        raise ValueError(f"lora rank must be at least 1, got {rank}")
    names = _targets(targets)
    matched = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names}
    for name, module in matched.items():
        if not isinstance(module, (nn.Linear, Conv1D)):  # bitsandbytes' Linear4bit is an nn.Linear
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer; "
                             "choose other lora_targets")
    if not matched:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
        raise ValueError(f"no module of {type(model).__name__} matches lora_targets={targets!r}; "
                         f"its linear layers are named {', '.join(linears)}")
    peft = import_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=float(alpha or rank), target_modules=names, lora_dropout=0.0,
                             fan_in_fan_out=any(isinstance(m, Conv1D) for m in matched.values()))
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for p in adapter_parameters(model).values():  # peft gives an NF4 base's adapters its compute dtype
        p.data = p.data.float()
    return list(matched)


def has_lora(model: nn.Module) -> bool:
    """True when peft LoRA layers are in the model (apply_lora's, or any peft injected)."""
    if "peft" not in sys.modules:  # nothing injected adapters yet: spare the import
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    if not has_lora(model):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA adapters' parameters by their names in the model (peft's: <module>.lora_A.default.weight, ...)."""
    return {f"{name}.{key}": p for name, m in _lora_layers(model).items()
            for key, p in m.named_parameters() if key.startswith(("lora_A.", "lora_B."))}


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (model's state dict, or one gathered from it, e.g. under FSDP) with every adapter folded into its
    base weight: the keys and values of the model before apply_lora, the adapters' deltas added, and an NF4 base
    dequantized to the model's dtype. Computed on the state, not by peft's in-place merge, so the live model and a
    gathered state stay as they are."""
    import_peft()
    from peft.utils.other import transpose

    state = dequantized_state_dict(model, state)
    for name, module in _lora_layers(model).items():
        a, b = (state.pop(f"{name}.lora_{x}.{ADAPTER}.weight").float() for x in "AB")
        delta = transpose(b @ a, module.fan_in_fan_out) * module.scaling[ADAPTER]
        for key in [k for k in state if k.startswith(f"{name}.base_layer.")]:
            state[f"{name}.{key.removeprefix(f'{name}.base_layer.')}"] = state.pop(key)
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (peft's merge) and put the base layers back, in place; returns the
    model."""
    for name, module in _lora_layers(model).items():
        module.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Write the adapters of `state` (model's state dict, or one gathered from it) to `folder` in peft's format
    (adapter_config.json, adapter_model.safetensors), loadable with PeftModel.from_pretrained on the base or with
    kdfast.models.load_model. The base recorded is where the model's weights were loaded from (config._name_or_path)
    when that is a folder here or a hub id, else none (load_model then needs base=)."""
    peft = import_peft()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapters = peft.get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER)
    save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapters.items()},
              str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.copy(model.peft_config[ADAPTER])
    config.base_model_name_or_path, config.inference_mode = _source(model), True  # as PeftModel.save_pretrained
    config.save_pretrained(str(folder))
    return folder


def _source(model: nn.Module) -> str | None:
    """The folder (absolute) or hub id the model's weights were loaded from; None for a model built in memory."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name:
        return None
    try:
        path = local_path(name)
    except ValueError:  # a path that is gone (a temporary folder)
        return None
    return str(path.resolve()) if path is not None else name

