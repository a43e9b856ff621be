"""What the fast paths adapt to: whether Triton runs in its CPU interpreter, and the memory budgets of every
chunked loop (one table, so a tuning lands in one place)."""
from __future__ import annotations

import os

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
