"""Triton kernels (GPU; run on the CPU in tests through TRITON_INTERPRET=1)."""
