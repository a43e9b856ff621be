"""Per-token statistics: kdfast's one-pass kernel vs the usual torch way (eager, torch.compile), same run.

python benchmarks/bench_token_stats.py [--device cpu|cuda]  ->  benchmarks/results/token-stats-<device>.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kdfast  # noqa: E402
from benchmarks.common import copy_bandwidth, median_ms, mib, peak_bytes, write_table  # noqa: E402
from kdfast.ops.token_stats import active_backend  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = {"cpu": "≥ 4× torch eager, extra memory O(N)",
           "cuda": "≥ 75% of the read-bandwidth bound, ≥ 5× torch eager"}


def eager(logits: torch.Tensor, targets: torch.Tensor):
    """The usual way (mimir / Min-K%++ code): a materialized fp32 log_softmax, then sums over it."""
    z = logits.float()
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    p = logp_all.exp()
    mu = (p * logp_all).sum(-1)
    sigma = ((p * logp_all.square()).sum(-1) - mu.square()).clamp_min(0).sqrt()
    top1 = z.argmax(-1) == targets
    lse = z.gather(-1, targets[:, None]).squeeze(-1) - logp
    return logp, lse, -mu, mu, sigma, top1


def cpu_load_note() -> str:
    """How busy the (shared) CPU was: numbers taken under load are noisy."""
    parts = []
    if os.path.exists("/proc/loadavg"):
        parts.append("load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    if os.path.exists("/proc/pressure/cpu"):
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        parts.append("CPU pressure " + some.split()[1])
    return ", ".join(parts) or "load unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, help="tokens (default: 4096 on cpu, 16384 on cuda)")
    ap.add_argument("--vocab", type=int, help="vocabulary (default: 49152 on cpu, 128256 on cuda)")
    ap.add_argument("--dtypes", help="comma-separated of fp32,bf16,fp16 (default: fp32,bf16 on cpu, bf16 on cuda)")
    ap.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                    help="time torch.compile of the eager way (auto: when --budget leaves room for compiling)")
    ap.add_argument("--budget", type=float, help="seconds this script may take (default: none on cpu, 40 on cuda: "
                    "gpu_check.sh gives it 45)")
    args = ap.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    budget = args.budget or (float("inf") if cpu else 40.0)
    n = args.n or (4096 if cpu else 16384)
    v = args.vocab or (49152 if cpu else 128256)
    dtypes = (args.dtypes or ("fp32,bf16" if cpu else "bf16")).split(",")
    backend = active_backend(device)
    bandwidth = None if cpu else copy_bandwidth(device)

    header = ["dtype", "method", "time ms", "tokens/s", "peak MiB", "speed-up vs eager", "max |Δlogp| vs eager"]
    if not cpu:
        header.append("of bandwidth bound")
    rows: list[list[object]] = []
    notes = [f"N={n} tokens, V={v}; target: {TARGETS[device.type]}",
             "eager: fp32 log_softmax, gather, p·log p sums, Min-K%++ moments from the materialized softmax, argmax",
             f"kdfast backend: {backend} ({kdfast.backends()['extension']})"]
    if cpu:
        notes.append(f"{torch.get_num_threads()} threads; {cpu_load_note()} at the start (a shared machine: noisy)")
    else:
        notes.append(f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write); "
                     "bandwidth bound = N·V·(bytes per logit) / that")

    def add_row(dt_name, method, fn, ref_logp, base_ms):
        ms = median_ms(fn, device, warmup=1 if cpu else 3, reps=5 if cpu else 20)
        peak = peak_bytes(fn, device)
        out = fn()
        logp = out.logp if hasattr(out, "logp") else out[0]
        diff = (logp.float() - ref_logp).abs().max().item() if ref_logp is not None else 0.0
        row = [dt_name, method, ms, n / (ms / 1e3), mib(peak), (base_ms or ms) / ms, diff]
        if not cpu:
            row.append(n * v * DTYPES[dt_name].itemsize / bandwidth * 1e3 / ms)  # read the logits once
        rows.append(row)
        return ms

    gen = torch.Generator(device=device).manual_seed(0)
    compiled = []
    for dt_name in dtypes:
        dtype = DTYPES[dt_name]
        logits = (torch.randn(n, v, generator=gen, device=device) * 3).to(dtype)
        targets = torch.randint(0, v, (n,), generator=gen, device=device)
        ref_logp = eager(logits, targets)[0]
        base = add_row(dt_name, "torch eager", lambda: eager(logits, targets), ref_logp, None)
        add_row(dt_name, f"kdfast ({backend})", lambda: kdfast.token_stats(logits, targets, backend=backend),
                ref_logp, base)
        if backend != "torch":
            add_row(dt_name, "kdfast (torch fallback)", lambda: kdfast.token_stats(logits, targets, backend="torch"),
                    ref_logp, base)
        compiled.append((dt_name, logits, targets, ref_logp, base))
        del logits, targets, ref_logp
    title = f"Per-token statistics (logp, lse, entropy, Min-K%++ moments, top-1), {device.type}"
    write_table("token-stats", device, title, header, rows, notes)

    # torch.compile last, and the table written before it: compiling can take longer than a GPU check allows.
    elapsed = time.perf_counter() - start
    want = args.compile == "yes" or args.compile == "auto" and elapsed + 30 * len(compiled) < budget
    if not want:
        notes.append(f"torch.compile not timed ({args.compile}; {elapsed:.0f} s of a {budget:.0f} s budget used)")
        write_table("token-stats", device, title, header, rows, notes)
        return
    fn = torch.compile(eager, dynamic=False)
    for dt_name, logits, targets, ref_logp, base in compiled:
        t0 = time.perf_counter()
        fn(logits, targets)
        notes_key = f"torch.compile ({dt_name}) compiled in {time.perf_counter() - t0:.0f} s"
        add_row(dt_name, "torch.compile (eager way)", lambda: fn(logits, targets), ref_logp, base)
        notes.append(notes_key)
    rows.sort(key=lambda r: dtypes.index(r[0]))
    write_table("token-stats", device, title, header, rows, notes)


if __name__ == "__main__":
    main()
