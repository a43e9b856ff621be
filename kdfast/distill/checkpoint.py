"""Checkpoints: student weights and optimizer state as safetensors, the rest as JSON, written atomically.

Layout of <out>/checkpoints/step-NNNNNNNN/: student.safetensors (a LoRA student's adapters only),
optimizer.safetensors + optimizer.json, state.json (step, scheduler, data order, metrics: shared by all processes),
and per process rank-R.json / rank-R.safetensors (RNG states, technique state such as the replay buffer or MiniLLM's
rollouts). Under FSDP or DeepSpeed the (sharded) model and optimizer go through accelerate's save_state into
accelerate/ instead.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, load_model, save_file, save_model

from kdfast.io import atomic_path, atomic_write_json
from kdfast.lora import adapter_parameters

_STEP = re.compile(r"step-(\d+)$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(out) / "checkpoints"
    if not root.exists():
        return None
    done = [p for p in root.glob("step-*") if _STEP.search(p.name) and (p / "state.json").exists()]
    return max(done, key=lambda p: int(_STEP.search(p.name).group(1)), default=None)


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def save_checkpoint(path: Path, accelerator, student: torch.nn.Module, optimizer, shared: dict, rank_state: dict,
                    rank_tensors: dict[str, torch.Tensor], keep: int) -> None:
    """Write a checkpoint folder atomically (all processes call this); keep only the newest `keep` checkpoints."""
    main, rank = accelerator.is_main_process, accelerator.process_index
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(path)) if main else None
        if main:
            tmp.mkdir()
        tmp = broadcast_object_list([tmp])[0] if accelerator.num_processes > 1 else tmp
        if _sharded(accelerator):
            accelerator.save_state(str(tmp / "accelerate"))
        elif main:
            _save_student(student, tmp / "student.safetensors")
            _save_optimizer(optimizer, tmp)
        rng_json, rng_tensors = _rng_state()
        atomic_write_json(tmp / f"rank-{rank}.json", {"rng": rng_json, **rank_state})
        save_file({**rng_tensors, **{k: v.contiguous().cpu() for k, v in rank_tensors.items()}},
                  str(tmp / f"rank-{rank}.safetensors"))
        accelerator.wait_for_everyone()
        if main:
            atomic_write_json(tmp / "state.json", shared)
    accelerator.wait_for_everyone()
    if main:
        older = sorted((p for p in path.parent.glob("step-*") if _STEP.search(p.name) and p != path),
                       key=lambda p: int(_STEP.search(p.name).group(1)))
        for stale in older[: max(0, len(older) - keep + 1)]:
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, accelerator, student: torch.nn.Module, optimizer) -> tuple[dict, dict, dict]:
    """Restore weights, optimizer and this process's RNG; returns (shared state, rank state, rank tensors)."""
    rank = accelerator.process_index
    if _sharded(accelerator):
        accelerator.load_state(str(path / "accelerate"))
    else:
        _load_student(student, path / "student.safetensors")
        _load_optimizer(optimizer, path)
    rank_file = path / f"rank-{rank}.json"
    if not rank_file.exists():
        raise ValueError(f"{path} was written by fewer processes than this run has ({accelerator.num_processes}); "
                         "resume with the same number of processes")
    rank_state = json.loads(rank_file.read_text())
    tensors = load_file(str(path / f"rank-{rank}.safetensors"))
    _set_rng_state(rank_state.pop("rng"), tensors)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    return json.loads((path / "state.json").read_text()), rank_state, tensors


def _save_student(student: torch.nn.Module, path: Path) -> None:
    """The student's weights; of a LoRA student only the adapters (peft's names): its base is frozen, and may be
    NF4, which a state dict does not round-trip."""
    adapters = adapter_parameters(student)
    if adapters:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(path))
    else:
        save_model(student, str(path))


def _load_student(student: torch.nn.Module, path: Path) -> None:
    adapters = adapter_parameters(student)
    if not adapters:
        load_model(student, str(path), device=str(next(student.parameters()).device))
        return
    saved = load_file(str(path))
    if saved.keys() != adapters.keys():
        raise ValueError(f"{path} holds other weights than this LoRA student's adapters (first differences: "
                         f"{sorted(saved.keys() ^ adapters.keys())[:3]}); resume with the run's student and "
                         "lora_rank / lora_targets")
    with torch.no_grad():
        for name, param in adapters.items():
            param.copy_(saved[name])


def _save_optimizer(optimizer, folder: Path) -> None:
    """Optimizer tensors to safetensors (state.<param>.<name>), everything else to JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        _split_state(entries, f"state.{pid}.", tensors, scalars.setdefault(str(pid), {}))
    save_file(tensors, str(folder / "optimizer.safetensors"))
    atomic_write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def _load_optimizer(optimizer, folder: Path) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for pid, entries in meta["scalars"].items():
        state[int(pid)] = entries
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        _, pid, name = key.split(".", 2)
        *parents, leaf = name.split("/")
        node = state.setdefault(int(pid), {})
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _split_state(entries: dict, prefix: str, tensors: dict, scalars: dict) -> None:
    """Tensors of one parameter's state to `tensors` (nested dicts, as bitsandbytes keeps, as a/b names), the
    rest to `scalars` (nested alike)."""
    for name, value in entries.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous().cpu()
            # bitsandbytes shares one quantization map between parameters; safetensors wants distinct storage
            shared = any(t.untyped_storage().data_ptr() == value.untyped_storage().data_ptr() for t in tensors.values())
            tensors[prefix + name] = value.clone() if shared else value
        elif isinstance(value, dict):
            _split_state(value, f"{prefix}{name}/", tensors, scalars.setdefault(name, {}))
        else:
            scalars[name] = value


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}, tensors


def _set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[-1]))
    cuda = [tensors[k] for k in keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
