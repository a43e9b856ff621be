"""GPU tuning sweep: the divergence kernel's (BLOCK, num_warps) and the fused-linear op's token chunk.

Prints a table and the best kernel config as `best KDFAST_DIVERGENCE_CONFIG=B,W` (fkl + jsd time, N=16384,
V=128256, bf16); writes benchmarks/results/tune-divergence-<device>.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks.common import copy_bandwidth, peak_bytes, write_table  # noqa: E402

CONFIGS = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]


def time_kernel(kind: str, s: torch.Tensor, t: torch.Tensor) -> float:
    import kdfast

    def run():
        s.grad = None
        kdfast.distill_loss(s, t, kind, backend="triton").backward()

    return do_bench(run, warmup=50, rep=300, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=80.0, help="seconds for the whole sweep")
    args = parser.parse_args()
    device = torch.device("cuda")
    start = time.perf_counter()
    n, V = 16384, 128256
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, V, device=device, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    t = (torch.randn(n, V, device=device, generator=g) * 2).to(torch.bfloat16)
    bound_ms = 10 * n * V / copy_bandwidth(device) * 1e3
    rows, totals = [], {}
    for block, warps in CONFIGS:
        if time.perf_counter() - start > args.budget * 0.6:
            break
        os.environ["KDFAST_DIVERGENCE_CONFIG"] = f"{block},{warps}"
        times = {kind: time_kernel(kind, s, t) for kind in ("fkl", "jsd")}
        totals[(block, warps)] = sum(times.values())
        rows += [[f"divergence {kind}", f"BLOCK {block}, {warps} warps", ms, ms / bound_ms, "-"]
                 for kind, ms in times.items()]
    os.environ.pop("KDFAST_DIVERGENCE_CONFIG")
    del s, t
    rows += fused_chunks(device, start, args.budget)
    best = min(totals, key=totals.get)
    write_table("tune-divergence", device, "Tuning sweep: divergence kernel config, fused-linear chunk",
                ["op", "setting", "median ms", "x two-pass bound", "peak MiB"], rows,
                [f"divergence: N={n}, V={V}, bf16, forward+backward; "
                 f"bound = 10·N·V bytes / copy bandwidth = {bound_ms:.2f} ms",
                 "fused-linear: N=8192, Hs=2048, Ht=4096, V=128256, bf16, jsd, 0.5·CE + 0.5·JSD",
                 f"best divergence config (fkl + jsd): BLOCK {best[0]}, {best[1]} warps"])
    print(f"best KDFAST_DIVERGENCE_CONFIG={best[0]},{best[1]}")


def fused_chunks(device: torch.device, start: float, budget: float) -> list[list]:
    import kdfast

    g = torch.Generator(device=device).manual_seed(1)
    n, hs, ht, V = 8192, 2048, 4096, 128256
    r = lambda *shape: (torch.randn(*shape, device=device, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    hidden, weight = r(n, hs).mul_(50).requires_grad_(), r(V, hs).requires_grad_()
    t_hidden, t_weight = r(n, ht).mul_(50), r(V, ht)
    labels = torch.randint(0, V, (n,), device=device, generator=g)
    rows = []
    for chunk in (1024, 2048, 4096):
        if time.perf_counter() - start > budget:
            break

        def run():
            kdfast.fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, kind="jsd", hard_weight=0.5,
                                             soft_weight=0.5, chunk_size=chunk).backward()

        ms = do_bench(run, warmup=3, rep=200, return_mode="median")
        hidden.grad = weight.grad = None
        peak = peak_bytes(run, device)
        hidden.grad = weight.grad = None
        rows.append(["fused-linear jsd", f"chunk {chunk}", ms, "-", peak / 2**20])
    return rows


if __name__ == "__main__":
    main()
