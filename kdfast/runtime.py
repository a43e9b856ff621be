"""What the fast paths adapt to: whether Triton runs in its CPU interpreter, and the memory budgets of every
chunked loop (one table, so a tuning lands in one place)."""
from __future__ import annotations

import os
import warnings

import torch

# Divergence torch backend: elements per chunk. A few MiB per fp32 temporary keeps the ~10 temporaries of a chunk
# in cache.
DIVERGENCE_CHUNK_ELEMENTS = 1 << 19
# token_stats torch backend: bytes of one fp32 [rows, V] temporary (a few live at once); large enough that the
# per-op overhead (a thread-pool round trip on CPU, a launch on GPU) stays small.
TOKEN_STATS_GPU_CHUNK_BYTES = 1 << 28
TOKEN_STATS_CPU_CHUNK_BYTES = 1 << 26
# token_stats_from_hidden with chunk_size=None: bytes of logits alive at once.
HIDDEN_STATS_LOGIT_BYTES = 256 << 20
# Fused-linear distillation: bytes of one chunk's student + teacher logits; the GPU floor (in tokens) keeps the
# GEMMs efficient. On an H200 at N=8192, V=128256 a 512 MiB budget (1024 tokens) took 1.8 GB and 43.7 ms, 2 GiB
# (4096) 4.0 GB and 39.8 ms (benchmarks/results/tune-divergence-h200.md): memory is what that op is for.
FUSED_LINEAR_GPU_CHUNK_BYTES = 512 << 20
FUSED_LINEAR_CPU_CHUNK_BYTES = 1 << 26
FUSED_LINEAR_GPU_MIN_CHUNK = 512
# Trainer per-token log-probs from hidden states (distill.objective.token_nll): logits (elements) per chunk.
TOKEN_NLL_CHUNK_ELEMENTS = 1 << 25
# ULD: elements per chunk; larger than the divergence op's, since the row sorts (which dominate) run faster on more
# rows at once (256 x 49152 on 2 CPU threads: 1.6 s in chunks of 10 rows, 1.2 s in chunks of 40).
ULD_CHUNK_ELEMENTS = 1 << 21


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors in its interpreter (the tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def bf16_is_native(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run in hardware: a CUDA device with bf16, or a CPU with AVX512-BF16 or AMX (oneDNN).

    Elsewhere torch emulates them: on a 2-core AVX2 EPYC a [1536, 576] x [576, 1536] bf16 matmul took 2.2 s against
    25 ms in fp32, so bf16 autocast there turns a 20-minute audit into hours.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_bf16_emulated(device: torch.device, what: str) -> None:
    """A warning before a long job when bf16 was asked for where it is emulated (see bf16_is_native)."""
    if not bf16_is_native(device):
        warnings.warn(f"{what}: bf16 on this {device.type} is emulated in software (no AVX512-BF16/AMX), far slower "
                      "than fp32; turn it off (bf16: false / autocast: false) unless you want bf16's numerics",
                      stacklevel=3)


def launch_rank() -> int:
    """The rank torchrun / accelerate launch gave this process (0 without a launcher), known before any group."""
    return int(os.environ.get("RANK", "0"))


def launch_device() -> torch.device:
    """This process's CUDA device under a launcher (cuda:LOCAL_RANK; cuda:0 without one)."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group the launcher describes in the environment (nccl on CUDA, gloo elsewhere); the device
    of this rank (cuda:LOCAL_RANK under a multi-process CUDA launch, else `device`)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = launch_device()
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
