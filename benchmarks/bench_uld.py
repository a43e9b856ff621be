"""ULD (cross-tokenizer) loss, forward+backward, beside kdfast's dense fkl at the same V (issue 18).

python benchmarks/bench_uld.py [--device cpu|cuda] [--threads 1]  ->  benchmarks/results/uld-<device>.md
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The script's own folder first: a site-packages `benchmarks` package would shadow this folder's namespace package.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402
from common import median_ms, mib, peak_bytes, write_table  # noqa: E402

import kdfast  # noqa: E402
from kdfast.ops.uld import uld_loss  # noqa: E402

V_TEACHER = 49152  # SmolLM2's vocabulary
CONFIGS = [  # (label, N, Vs, loss on (s, t))
    ("kdfast fkl (dense, same V)", V_TEACHER, lambda s, t: kdfast.distill_loss(s, t, "fkl")),
    ("kdfast uld, full sort", V_TEACHER, lambda s, t: uld_loss(s, t)),
    ("kdfast uld, top_k=64", V_TEACHER, lambda s, t: uld_loss(s, t, top_k=64)),
    ("kdfast uld, full sort, Vs=32000", 32000, lambda s, t: uld_loss(s, t)),
    ("eager uld (float32 reference: softmax, sort, pad, L1)", V_TEACHER,
     lambda s, t: uld_loss(s, t, backend="reference")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--n", type=int, default=1024, help="aligned tokens")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    load = os.getloadavg()[0]
    gen = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(args.n, V_TEACHER, device=device, generator=gen).mul_(2).to(dtype)
    rows, base = [], None
    for label, vs, fn in CONFIGS:
        s = torch.randn(args.n, vs, device=device, generator=gen).mul_(2).to(dtype).requires_grad_()

        def step():
            s.grad = None
            fn(s, t).backward()

        ms = median_ms(step, device, warmup=1, reps=5, max_seconds=60.0)
        s.grad = None
        peak = mib(peak_bytes(step, device))
        base = base or (ms, peak)
        rows.append([args.n, vs, V_TEACHER, str(dtype).removeprefix("torch."), label, ms, peak, ms / base[0],
                     peak / base[1]])
        print(*rows[-1], sep=" | ", flush=True)
    notes = ["forward+backward of the mean loss over N aligned rows, student gradient only, T=1; peak = memory "
             "allocated beyond the inputs (the returned gradient included); ratios vs the first row.",
             f"CPU threads: {torch.get_num_threads()}; 1-minute load average {load:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end: the machine was shared with other jobs, times are noisy "
             "(peaks are not)." if device.type == "cpu" else "",
             "No Triton kernel was written (not measured against one): with a full sort the time is torch.sort's "
             "(sorting a 256 x 49152 fp32 block alone took 1.2 s per side on this machine); top_k replaces the "
             "sort by torch.topk."]
    write_table("uld", device, "ULD loss (cross-tokenizer) beside dense fkl: forward+backward",
                ["N", "Vs", "Vt", "dtype", "impl", "median ms", "peak MiB", "time / fkl", "peak / fkl"], rows,
                [n for n in notes if n])


if __name__ == "__main__":
    main()
