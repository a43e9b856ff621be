"""Test set-up: run Triton kernels in the interpreter when no GPU is present (before kdfast is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random but reproducible."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item() if os.environ.get("KDFAST_RANDOM_SEED") else 1234)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")
