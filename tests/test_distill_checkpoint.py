"""Checkpoints: optimizer state and RNG states survive the safetensors/JSON round trip; the newest is found; a run
start removes the temporaries of killed runs, never a live writer's."""
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from kdfast import io, models
from kdfast.data import bundled_records
from kdfast.distill import DistillConfig, Distiller
from kdfast.distill.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return model, opt


def test_round_trip(tmp_path):
    acc = Accelerator(cpu=True)
    model, opt = _model_and_optimizer()
    path = checkpoint_path(tmp_path, 7)
    save_checkpoint(path, acc, model, opt, {"step": 7}, {"technique": {"t": 0.3}},
                    {"buffer.ids": torch.arange(5)}, keep=2)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    other, opt2 = _model_and_optimizer()
    with torch.no_grad():
        other[0].weight.zero_()
    shared, rank, tensors = load_checkpoint(path, acc, other, opt2)
    assert shared == {"step": 7} and rank == {"technique": {"t": 0.3}}
    assert torch.equal(tensors["buffer.ids"], torch.arange(5))
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == [dict(g, betas=tuple(g["betas"])) for g in s2["param_groups"]]
    for pid, entries in s1["state"].items():
        assert all(torch.equal(v, s2["state"][pid][k]) for k, v in entries.items())


def test_latest_and_retention(tmp_path):
    acc = Accelerator(cpu=True)
    model, opt = _model_and_optimizer()
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 10):
        save_checkpoint(checkpoint_path(tmp_path, step), acc, model, opt, {"step": step}, {}, {}, keep=2)
    (tmp_path / "checkpoints" / "step-00000099").mkdir()   # an incomplete folder (no state.json) is ignored
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    assert not checkpoint_path(tmp_path, 1).exists() and checkpoint_path(tmp_path, 2).exists()


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", ""])
    done.wait()
    return done.pid


def _temporary(folder: Path, name: str, pid: int | None, host: str = io.HOST, age: float = 0.0) -> Path:
    """A temporary as atomic_path names it (pid None: the older unnamed form), `age` seconds old."""
    tmp = folder / (f".{name}.tmp-{pid}-{host}-abcd_123" if pid is not None else f".{name}.tmpabcd_123")
    (tmp / name).mkdir(parents=True)
    os.utime(tmp, (time.time() - age, time.time() - age))
    return tmp


def test_a_run_start_removes_the_temporaries_of_killed_runs_only(tmp_path):
    """A distill run starting in a folder removes what killed runs left; a live writer's temporary stays, and so do
    those whose writer it cannot check (another host's, an older kdfast's) outside a claimed folder."""
    root = tmp_path / "checkpoints"
    dead = [_temporary(root, "step-00000002", _dead_pid()), _temporary(tmp_path, "metrics.json", _dead_pid())]
    live = _temporary(root, "step-00000003", os.getpid())
    unknown = [_temporary(root, "step-00000004", 1, host="0" * 8, age=3600), _temporary(root, "x", None, age=3600)]
    cfg = DistillConfig(technique="sft", lr=1e-3, batch_size=4, max_steps=1, max_len=112, max_prompt_len=100,
                        progress=False, out=str(tmp_path))
    Distiller(None, models.tiny_model("llama", hidden=32), models.tiny_tokenizer(), cfg).train(bundled_records()[:8])
    assert not any(p.exists() for p in dead) and live.exists() and all(p.exists() for p in unknown)
    assert (tmp_path / "final").exists()


def test_a_claimed_folder_also_drops_unknown_writers_temporaries_older_than_its_lock(tmp_path):
    dead, live = _temporary(tmp_path, "a", _dead_pid()), _temporary(tmp_path, "b", os.getpid())
    old = [_temporary(tmp_path, "c", 1, host="0" * 8, age=3600), _temporary(tmp_path / "sub", "d", None, age=3600)]
    newer = _temporary(tmp_path, "e", 1, host="0" * 8, age=-3600)  # written after the lock was taken
    other_run = tmp_path / "other"
    (other_run / io.LOCK_FILE).parent.mkdir()
    (other_run / io.LOCK_FILE).write_text("1 elsewhere\n")
    theirs = _temporary(other_run, "f", 1, host="0" * 8, age=3600)
    with io.claim_folder(tmp_path):
        assert not dead.exists() and not any(p.exists() for p in old)
        assert live.exists() and newer.exists() and theirs.exists()
    with io.atomic_path(tmp_path / "g.json") as tmp:  # what the pid and host rules read
        assert tmp.parent.name.startswith(f".g.json.tmp-{os.getpid()}-{io.HOST}-")
        tmp.write_text("{}")
