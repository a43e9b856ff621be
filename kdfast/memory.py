"""Measured memory: the bytes models and optimizers hold, and the peak a function allocates on top of them.

The planner's check (tests/test_distill_plan_measured.py, benchmarks/bench_distill_memory.py) and every benchmark's
peak column read memory here. CPU peaks come from the profiler's allocation stream; CUDA peaks from the allocator.
"""
from __future__ import annotations

import gc
from typing import Callable, Iterable

import torch
from torch import nn


def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
        yield from (p.grad for p in obj.parameters() if p.grad is not None)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _tensors(state)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def resident_bytes(*objects) -> int:
    """Bytes of the distinct storages held by modules (parameters, buffers, grads), optimizers (state) or tensors.

    A storage shared by several tensors (tied embeddings, views) counts once; meta tensors count nothing.
    """
    seen: dict[int, int] = {}
    for obj in objects:
        for t in _tensors(obj):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak memory fn() allocates beyond what was live before it (inputs excluded, outputs included)."""
    device = torch.device(device)
    gc.collect()
    if device.type != "cuda":
        return _cpu_peak_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
