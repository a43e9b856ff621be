"""Test set-up: Triton in the interpreter without a GPU (set before kdfast is imported), one thread per test
process (subprocesses included), and a fresh random seed per run (printed in the header; KDFAST_SEED=<n> replays
a run)."""
import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One thread per test process, and per process a test starts (OMP_NUM_THREADS is inherited): the tests' tiny models
# are overhead-bound, and beside another xdist worker two OpenMP threads on two cores stall on barriers (the tiny
# audit subprocess took 270 s instead of 18 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_configure(config):
    # Set once in the controller; xdist workers start later and inherit it.
    os.environ.setdefault("KDFAST_SEED", str(random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"kdfast random seed: {os.environ['KDFAST_SEED']} (KDFAST_SEED={os.environ['KDFAST_SEED']} replays it)"


@pytest.fixture
def gen(request):
    """A generator seeded from the run's seed and the test's id: fresh inputs every run, reproducible on demand."""
    seed = int(os.environ["KDFAST_SEED"]) ^ zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")
