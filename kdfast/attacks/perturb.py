"""MoPe (Li et al. 2023): how much seeded Gaussian parameter noise raises a record's loss, whole model or one block.

The stored parameters are never written: while a module runs, forward hooks hand it W + ε for its own
parameters and put the original Parameter objects back afterwards. The model therefore ends bit-identical
by construction, and no more than one module's perturbed parameters exist at a time (no model copy).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdfast.attacks.bulk import mean_log_likelihoods
from kdfast.data import Encoded
from kdfast.store import seed_from


def noise_seed(seed: int, index: int, name: str) -> int:
    """The generator seed of parameter `name` in perturbation `index`: the same wherever and whenever it is drawn."""
    return seed_from(seed, index, name, sep="/")


class Perturbation:
    """Context manager: while `index` is set, every module owning parameters inside `scope` (the whole model by
    default) runs with W + σ·ε, ε ~ N(0, I) drawn from noise_seed(seed, index, name) in fp32.

    Tied weights share one name (their first in model.named_parameters()), hence the same noise. Code that
    reads a parameter outside its owner's forward does not see the noise (HF causal LMs do not).
    """

    def __init__(self, model: nn.Module, sigma: float, seed: int = 0, scope: nn.Module | None = None):
        self.sigma, self.seed = sigma, seed
        self.index: int | None = None
        self._names = {}
        for name, p in model.named_parameters():
            self._names.setdefault(id(p), name)
        inside = {id(p) for p in (scope if scope is not None else model).parameters()}
        self._owners = [(m, [k for k, p in m._parameters.items() if p is not None and id(p) in inside])
                        for m in model.modules()]
        self._owners = [(m, keys) for m, keys in self._owners if keys]
        self._saved: dict[tuple[int, str], tuple[nn.Module, nn.Parameter]] = {}
        self._handles = []

    def __enter__(self) -> "Perturbation":
        for module, keys in self._owners:
            self._handles.append(module.register_forward_pre_hook(self._swap_in(keys)))
            self._handles.append(module.register_forward_hook(self._swap_out(keys), always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for (_, key), (module, original) in list(self._saved.items()):
            module._parameters[key] = original
        self._saved.clear()
        self.index = None

    def noisy(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """W + σ·ε for perturbation self.index, in W's dtype (a new tensor; W is not touched)."""
        g = torch.Generator(device=p.device).manual_seed(noise_seed(self.seed, self.index, name))
        eps = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        return (p.detach().float() + self.sigma * eps).to(p.dtype)

    def _swap_in(self, keys: list[str]):
        def hook(module, args):
            if self.index is None:
                return
            for key in keys:
                original = module._parameters[key]
                self._saved[(id(module), key)] = (module, original)
                module._parameters[key] = self.noisy(original, self._names[id(original)])
        return hook

    def _swap_out(self, keys: list[str]):
        def hook(module, args, output):
            for key in keys:
                saved = self._saved.pop((id(module), key), None)
                if saved is not None:
                    module._parameters[key] = saved[1]
        return hook


def mope_scores(model: nn.Module, items: list[Encoded], base_ll: np.ndarray, n: int = 10, sigma: float = 0.01,
                seed: int = 0, scope: nn.Module | None = None, **batching) -> np.ndarray:
    """mean_i L(θ+ε_i) − L(θ) per item (float64 [len(items)]; higher = member: members sit in sharper minima).

    base_ll: mean ℓ_t at θ of each item from mean_log_likelihoods(..., fused=False). `batching` goes to
    mean_log_likelihoods (pad_id, batch_tokens, padding_side, autocast).
    """
    if n < 1 or sigma < 0:
        raise ValueError(f"MoPe needs n ≥ 1 perturbations and σ ≥ 0 (got n={n}, σ={sigma})")
    lls = []
    with Perturbation(model, sigma, seed, scope) as perturbation:
        for i in range(n):
            perturbation.index = i
            lls.append(mean_log_likelihoods(model, items, fused=False, **batching))
    return base_ll - np.mean(lls, axis=0)
