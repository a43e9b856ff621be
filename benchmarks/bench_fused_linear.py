"""Fused-linear distillation, forward+backward: kdfast vs materialized logits (eager, compiled) and Liger (issue 3).

python benchmarks/bench_fused_linear.py [--device cpu|cuda]  ->  benchmarks/results/fused-linear-<device>.md
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import kdfast  # noqa: E402
from benchmarks.common import median_ms, mib, peak_bytes, write_table  # noqa: E402
from kdfast import reference as ref  # noqa: E402
from kdfast.ops.fused_linear import pick_chunk_size  # noqa: E402

BETA, HARD, SOFT = 0.5, 0.5, 0.5  # Liger's LigerFusedLinearJSDLoss defaults
PLANS = {
    "cpu": dict(N=2048, Hs=576, Ht=576, V=49152, dtype=torch.float32, reps=3, budget_s=1500.0, compile_min_s=300.0),
    "cuda": dict(N=8192, Hs=2048, Ht=4096, V=128256, dtype=torch.bfloat16, reps=3, budget_s=48.0,
                 compile_min_s=30.0),
}
HEADER = ["impl", "median ms", "peak MiB", "time / kdfast", "peak / kdfast", "TFLOP/s", "note"]


def make_inputs(plan: dict, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    N, Hs, Ht, V, dtype = (plan[k] for k in ("N", "Hs", "Ht", "V", "dtype"))
    r = lambda *shape, scale: (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)  # noqa: E731
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    labels[::10] = -100
    return dict(hs=r(N, Hs, scale=1.0).requires_grad_(), ws=r(V, Hs, scale=Hs**-0.5).requires_grad_(),
                ht=r(N, Ht, scale=1.0), wt=r(V, Ht, scale=Ht**-0.5), labels=labels)


def kdfast_loss(x: dict) -> torch.Tensor:
    return kdfast.fused_linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"], kind="jsd", beta=BETA,
                                            hard_weight=HARD, soft_weight=SOFT)


def materialized_loss(hs, ws, ht, wt, labels) -> torch.Tensor:
    """The plain way: both [N, V] logit matrices, then the reference formulas with autograd."""
    logits = hs @ ws.t()
    with torch.no_grad():
        teacher_logits = ht @ wt.t()
    return (HARD * ref.cross_entropy(logits, labels)
            + SOFT * ref.distill_loss(logits, teacher_logits, "jsd", beta=BETA, labels=labels))


def liger_peers(device: torch.device) -> list[tuple[str, Callable | None, str]]:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return []
    chunked = lambda compiled: LigerFusedLinearJSDLoss(  # noqa: E731
        weight_hard_loss=HARD, weight_soft_loss=SOFT, beta=BETA, compiled=compiled)
    peers = [("liger LigerFusedLinearJSDLoss (uncompiled)", _args(chunked(False)), "hard+soft, chunk 1024")]
    if device.type == "cuda":  # the compiled peer last: its compile may not fit the time budget
        fused = LigerFusedLinearJSD(jsd_beta=BETA)
        peers.append(("liger LigerFusedLinearJSD", _args(fused), "soft loss only (no CE term)"))
        peers.append(("liger LigerFusedLinearJSDLoss (compiled)", None, "compile"))
    return peers


def _args(module) -> Callable[[dict], torch.Tensor]:
    return lambda x: module(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])


def compile_peer(name: str, x: dict) -> tuple[Callable | None, str]:
    """Build and warm a compiled peer (the compile time goes in the note); None with the reason if it fails."""
    if name.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = _args(LigerFusedLinearJSDLoss(weight_hard_loss=HARD, weight_soft_loss=SOFT, beta=BETA, compiled=True))
    else:
        compiled = torch.compile(materialized_loss)
        fn = lambda x: compiled(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])  # noqa: E731
    start = time.perf_counter()
    try:
        step(fn, x)()
    except Exception as err:  # noqa: BLE001 - a compiler failure is a table entry, not a crash
        return None, f"compile failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    return fn, f"compile {time.perf_counter() - start:.0f} s"


def step(fn: Callable[[dict], torch.Tensor], x: dict, clear: bool = True) -> Callable[[], None]:
    """One forward+backward; clear=False for the peak measurement, where freeing the previous gradients inside the
    measured call would hide the new ones."""
    def run() -> None:
        if clear:
            x["hs"].grad = x["ws"].grad = None
        fn(x).backward()
    return run


def flops(plan: dict) -> float:
    """Teacher logits 2·N·Ht·V, student logits + d(hidden) + d(weight) 6·N·Hs·V (docs/design.md §8)."""
    return 2.0 * plan["N"] * plan["V"] * (plan["Ht"] + 3 * plan["Hs"])


def measure(name: str, fn: Callable | None, note: str, x: dict, plan: dict, device: torch.device,
            deadline: float) -> list[object]:
    left = deadline - time.perf_counter()
    if left < 5 or (note == "compile" and left < plan["compile_min_s"]):
        return [name, "-", "-", "-", "-", "-", "skipped: time budget"]
    if note == "compile":
        fn, note = compile_peer(name, x)
        if fn is None:
            return [name, "-", "-", "-", "-", "-", note]
    try:
        ms = median_ms(step(fn, x), device, warmup=1, reps=plan["reps"], max_seconds=20.0)
        x["hs"].grad = x["ws"].grad = None
        peak = mib(peak_bytes(step(fn, x, clear=False), device))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return [name, "OOM", "OOM", "-", "-", "-", "out of memory"]
    except Exception as err:  # noqa: BLE001 - a failing peer is a table entry; main() fails the run if kdfast does
        return [name, "failed", "-", "-", "-", "-", f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"]
    return [name, ms, peak, "-", "-", flops(plan) / (ms / 1e3) / 1e12, note]


def finish(rows: list[list[object]], plan: dict, device: torch.device, interrupted: bool = False) -> None:
    base = next((r for r in rows if r[0] == "kdfast"), None)
    for r in rows:
        if base and all(isinstance(v, float) for v in (r[1], r[2], base[1], base[2])):
            r[3], r[4] = r[1] / base[1], r[2] / base[2]
    shape = ", ".join(f"{k}={plan[k]}" for k in ("N", "Hs", "Ht", "V")) + f", {str(plan['dtype'])[6:]}"
    notes = [f"{shape}; jsd beta={BETA}, loss = {HARD}·CE + {SOFT}·JSD, 10% of tokens ignored; forward+backward "
             f"with d(hidden) and d(weight) of the student; peak = memory allocated beyond the inputs.",
             f"TFLOP/s counts {flops(plan) / 1e12:.2f} TFLOP per step (2·N·Ht·V + 6·N·Hs·V)."]
    notes += target_notes(rows, base, device)
    if interrupted:
        notes.append("interrupted by the time limit: rows after the last one shown were not measured.")
    if device.type == "cpu":
        notes.append(f"CPU threads: {torch.get_num_threads()}; 1-minute load average {plan['load']:.1f} at the start, "
                     f"{os.getloadavg()[0]:.1f} at the end (on a shared machine absolute times are noisy).")
    write_table("fused-linear", device, "Fused-linear distillation: forward+backward", HEADER, rows, notes)


def target_notes(rows: list[list[object]], base: list[object] | None, device: torch.device) -> list[str]:
    timed = lambda r: base and isinstance(r[1], float) and isinstance(base[1], float)  # noqa: E731
    if device.type == "cpu":
        peer = next((r for r in rows if r[0] == "torch eager (materialized)" and timed(r)), None)
        if peer is None:
            return []
        mem, slow = base[2] / peer[2], base[1] / peer[1]
        return [f"target: peak {mem:.3f}x torch's (<= 1/4) at {slow:.2f}x its time (<= 1.3): "
                f"{'met' if mem <= 0.25 and slow <= 1.3 else 'NOT met'}"]
    liger = [r for r in rows if r[0].startswith("liger LigerFusedLinearJSDLoss") and timed(r)]
    if not liger:
        return []
    best = min(liger, key=lambda r: r[1])
    t, m = base[1] / best[1], base[2] / best[2]
    return [f"target vs {best[0]}: {t:.2f}x its time (<= 0.6), {m:.2f}x its peak (<= 0.5): "
            f"{'met' if t <= 0.6 and m <= 0.5 else 'NOT met'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 on an oversubscribed machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plan = dict(PLANS[args.device], load=os.getloadavg()[0])
    deadline = time.perf_counter() + plan["budget_s"]
    rows: list[list[object]] = []

    def on_timeout(*_):  # `timeout` sends SIGTERM: keep what was measured
        finish(rows, plan, device, interrupted=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_timeout)
    x = make_inputs(plan, device)
    materialized = lambda x: materialized_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])  # noqa: E731
    chunk = pick_chunk_size(plan["N"], plan["V"], plan["dtype"], device)
    impls = [("kdfast", kdfast_loss, f"chunk {chunk} tokens"), ("torch eager (materialized)", materialized, "")]
    impls += liger_peers(device)
    impls.append(("torch.compile (materialized)", None, "compile"))
    for name, fn, note in impls:
        rows.append(measure(name, fn, note, x, plan, device, deadline))
        print(*rows[-1], sep=" | ", flush=True)
    finish(rows, plan, device)
    if rows[0][1] == "failed":
        sys.exit(1)


if __name__ == "__main__":
    main()
