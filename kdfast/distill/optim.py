"""The student's optimizer: torch AdamW, bitsandbytes 8-bit (paged) AdamW or transformers' Adafactor."""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor")
MASTER_WEIGHTS = ("fp32", "bf16")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay, vectors (norms, biases) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(name: str, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `groups`.

    adamw: torch's, fused on CUDA (8 bytes of state per parameter, in the parameter's dtype). adamw_8bit /
    paged_adamw_8bit: bitsandbytes' blockwise 8-bit states (2 bytes per parameter; tensors under 4096 elements
    keep fp32 states; paged states can spill to host memory on CUDA). adafactor: factored second moments
    (about (rows + cols) × 4 bytes per matrix), no first moment, the given lr (no relative step).
    """
    if name == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        from kdfast.models import import_bitsandbytes

        bnb = import_bitsandbytes()
        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=lr, betas=betas, eps=eps)
    if name == "adafactor":
        from kdfast.models import import_bitsandbytes

        import_bitsandbytes()  # transformers.optimization imports peft, which imports bitsandbytes
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, beta1=None, scale_parameter=False, relative_step=False, warmup_init=False)
    raise ValueError(f"unknown optim {name!r}; choose one of {', '.join(OPTIMIZERS)}")
