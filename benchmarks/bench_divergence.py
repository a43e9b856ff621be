"""Divergence losses on logits, forward+backward: kdfast vs torch eager, torch.compile and Liger-Kernel (issue 2).

python benchmarks/bench_divergence.py [--device cpu|cuda]  ->  benchmarks/results/divergence-<device>.md
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
from benchmarks.common import copy_bandwidth, median_ms, mib, peak_bytes, write_table  # noqa: E402
from kdfast import reference as ref  # noqa: E402

BETA, ALPHA = 0.5, 0.1
PLANS = {  # shapes (N, V), the dtype, the shape every kind runs at (the target), and the wall-clock budget
    "cpu": dict(shapes=[(1024, 32000), (1024, 50257), (4096, 32000), (4096, 50257)], dtype=torch.float32,
                target=(4096, 32000), all_kinds_at=(1024, 32000), compile_at=[(1024, 32000), (4096, 32000)],
                budget_s=1500.0, compile_min_s=120.0, reps=3),
    "cuda": dict(shapes=[(n, v) for n in (4096, 16384) for v in (32000, 50257, 128256)], dtype=torch.bfloat16,
                 target=(16384, 128256), all_kinds_at=(16384, 128256), compile_at=[(4096, 32000)],
                 budget_s=75.0, compile_min_s=40.0, reps=5),
}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def measure(step: Callable[[], None], s: torch.Tensor, device: torch.device,
            reps: int) -> tuple[float | str, float | str, str]:
    """(median ms, peak MiB, note); an out-of-memory error becomes 'OOM' instead of a crash.

    The previous gradient is dropped before each step, outside the peak measurement: freeing it inside would
    hide the new one's allocation.
    """
    def timed() -> None:
        s.grad = None
        step()

    try:
        ms = median_ms(timed, device, warmup=1, reps=reps, max_seconds=20.0)
        s.grad = None
        peak = mib(peak_bytes(step, device))
        return ms, peak, ""
    except torch.cuda.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "OOM", "OOM", "out of memory"
    except Exception as err:  # noqa: BLE001 - a failing peer is a table entry; main() fails the run if kdfast does
        return "failed", "-", f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"


def backward_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: torch.Tensor,
                  t: torch.Tensor) -> Callable[[], None]:
    return lambda: loss_fn(s, t).backward()


def kdfast_fn(kind: str, **kw) -> Callable:
    return lambda s, t: kdfast.distill_loss(s, t, kind, beta=BETA, alpha=ALPHA, **kw)


def eager_fn(kind: str) -> Callable:
    return lambda s, t: ref.distill_loss(s, t, kind, beta=BETA, alpha=ALPHA)


def liger_peers(kind: str) -> list[tuple[str, Callable]]:
    """Liger-Kernel losses that compute this kind (log-prob / prob inputs made by torch, as Liger expects)."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    except ImportError:
        return []
    lsm = torch.log_softmax
    peers = [("liger LigerJSD(beta=0.5)", lambda s, t: LigerJSD(beta=0.5)(lsm(s, -1), lsm(t, -1)))]
    if kind == "fkl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        peers.append(("liger LigerKLDIVLoss", lambda s, t: kl(lsm(s, -1), lsm(t, -1))))
    elif kind == "rkl":
        peers.append(("liger LigerJSD(beta=1)", lambda s, t: LigerJSD(beta=1.0)(lsm(s, -1), lsm(t, -1))))
    elif kind == "tvd":
        tvd = LigerTVDLoss(reduction="batchmean")
        peers.append(("liger LigerTVDLoss", lambda s, t: tvd(torch.softmax(s, -1), torch.softmax(t, -1))))
    return peers


def compiled_fn(kind: str, s: torch.Tensor, t: torch.Tensor) -> tuple[Callable | None, str]:
    """torch.compile of the reference math, compiled (forward and backward) before timing; None when it fails."""
    fn = torch.compile(eager_fn(kind))
    start = time.perf_counter()
    try:
        backward_step(fn, s, t)()
    except Exception as err:  # noqa: BLE001 - any compiler failure is reported in the table, not fatal
        return None, f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    return fn, f"compile {time.perf_counter() - start:.0f} s"


def run_config(N: int, V: int, kind: str, plan: dict, device: torch.device, budget: Budget,
               bandwidth: float | None) -> list[list[object]]:
    dtype = plan["dtype"]
    gen = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(N, V, device=device, dtype=dtype, generator=gen).requires_grad_()
    t = torch.randn(N, V, device=device, dtype=dtype, generator=gen)
    impls: list[tuple[str, Callable | None, str]] = [("kdfast", kdfast_fn(kind), ""),
                                                      ("torch eager (reference)", eager_fn(kind), "")]
    if device.type == "cuda":
        impls += [(name, fn, "") for name, fn in liger_peers(kind)]
    if (N, V) in plan["compile_at"] and kind == "jsd":
        impls.append(("torch.compile (reference)", None, "compile"))
    if (N, V) == plan["target"]:  # last: it overwrites the student logits with gradients
        impls.append(("kdfast inplace_grad", kdfast_fn(kind, inplace_grad=True), "student logits buffer reused"))
    rows, base = [], ("-", "-")
    for name, fn, note in impls:
        ms = peak = "-"
        if budget.left() < 5:
            note = "skipped: time budget"
        elif note == "compile" and budget.left() < plan["compile_min_s"]:
            note = "skipped: compiling would overrun the time budget"
        else:
            if note == "compile":
                fn, note = compiled_fn(kind, s, t)
            if fn is not None:
                ms, peak, oom = measure(backward_step(fn, s, t), s, device, plan["reps"])
                note = note or oom
        if name == "kdfast":
            base = (ms, peak)
        rows.append(_row(N, V, dtype, kind, name, ms, peak, base, note, bandwidth))
    del s, t
    return rows


def _row(N, V, dtype, kind, name, ms, peak, base, note, bandwidth) -> list[object]:
    ratio = lambda a, b: a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"  # noqa: E731
    row = [N, V, str(dtype).replace("torch.", ""), kind, name, ms, peak, ratio(ms, base[0]), ratio(peak, base[1]),
           note]
    if bandwidth is not None:
        bound_ms = two_pass_bytes(N, V, dtype) / bandwidth * 1e3
        row[-1:-1] = [bound_ms, ratio(ms, bound_ms)]
    return row


def two_pass_bytes(N: int, V: int, dtype: torch.dtype) -> int:
    """Read student + teacher twice, write the student gradient once (10·N·V bytes in bf16)."""
    return 5 * N * V * dtype.itemsize


def target_notes(rows: list[list[object]], device: torch.device, plan: dict) -> list[str]:
    N, V = plan["target"]
    by = {(r[3], r[4]): r for r in rows if (r[0], r[1]) == (N, V)}
    notes = []
    for kind in ref.KINDS:
        mine = by.get((kind, "kdfast"))
        peer = by.get((kind, "torch eager (reference)" if device.type == "cpu" else "liger LigerJSD(beta=0.5)"))
        if not mine or not peer or not all(isinstance(x, float) for x in (mine[5], mine[6], peer[5], peer[6])):
            continue
        speed, mem = peer[5] / mine[5], mine[6] / peer[6]
        if device.type == "cpu":
            ok = mem <= 1 / 3 and speed >= 1.0
            notes.append(f"target N={N} V={V} {kind}: peak {mem:.3f}x eager (<= 1/3), {speed:.2f}x eager's speed "
                         f"(>= 1): {'met' if ok else 'NOT met'}")
        else:
            bound = mine[-3] if isinstance(mine[-3], float) else float("nan")
            ok = speed >= 3 and mem <= 1 / 3 and mine[5] <= 1.6 * bound
            notes.append(f"target N={N} V={V} {kind}: {speed:.2f}x Liger JSD's speed (>= 3), peak {mem:.3f}x Liger "
                         f"(<= 1/3), {mine[5] / bound:.2f}x the two-pass bound (<= 1.6): "
                         f"{'met' if ok else 'NOT met'}")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 on an oversubscribed machine")
    parser.add_argument("--shapes", help="override the shapes, e.g. 1024x32000,4096x32000 (the first is the target)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plan = dict(PLANS[args.device])
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
        plan.update(shapes=shapes, target=shapes[0], all_kinds_at=shapes[0], compile_at=shapes[:1])
    budget = Budget(plan["budget_s"])
    plan["load"] = os.getloadavg()[0]
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    rows: list[list[object]] = []

    def on_timeout(*_):  # `timeout` sends SIGTERM: keep what was measured
        finish(rows, plan, device, bandwidth, interrupted=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_timeout)
    # The target shape first: a time budget that runs out should cut the extras, not the figure that matters.
    for N, V in sorted(plan["shapes"], key=lambda shape: shape != plan["target"]):
        kinds = ref.KINDS if (N, V) == plan["all_kinds_at"] else ("jsd",)
        for kind in kinds:
            rows += run_config(N, V, kind, plan, device, budget, bandwidth)
            print(*rows[-1], sep=" | ", flush=True)
    finish(rows, plan, device, bandwidth)
    if any(r[4].startswith("kdfast") and r[5] == "failed" for r in rows):
        sys.exit(1)


def finish(rows: list[list[object]], plan: dict, device: torch.device, bandwidth: float | None,
           interrupted: bool = False) -> None:
    header = ["N", "V", "dtype", "kind", "impl", "median ms", "peak MiB", "time / kdfast", "peak / kdfast", "note"]
    notes = [f"forward+backward of the mean loss, student gradient only; beta={BETA}, alpha={ALPHA}, T=1; "
             "peak = memory allocated beyond the inputs (the returned gradient included)."]
    if bandwidth is not None:
        header[-1:-1] = ["2-pass bound ms", "x bound"]
        notes.append(f"measured device copy bandwidth {bandwidth / 1e9:.0f} GB/s; bound = 10·N·V bytes (bf16) / "
                     f"bandwidth. jsd/skl/srkl/tvd gradients need a third read of both inputs (14·N·V bytes).")
    else:
        notes.append("Liger-Kernel runs only on CUDA (its kernels would run in the Triton interpreter here).")
        notes.append(f"CPU threads: {torch.get_num_threads()}; 1-minute load average {plan['load']:.1f} at the start, "
                     f"{os.getloadavg()[0]:.1f} at the end (on a shared machine absolute times are noisy).")
    if interrupted:
        notes.append("interrupted by the time limit: configurations after the last row were not measured.")
    write_table("divergence", device, "Divergence losses: forward+backward", header, rows,
                notes + target_notes(rows, device, plan))


if __name__ == "__main__":
    main()
