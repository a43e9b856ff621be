"""Checkpoints: optimizer state and RNG states survive the safetensors/JSON round trip; the newest is found."""
import random

import numpy as np
import torch
from accelerate import Accelerator

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
