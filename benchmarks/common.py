"""Shared benchmark helpers: device facts, median timing, peak memory, and the results tables."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from kdfast.memory import peak_bytes  # noqa: F401  (the benchmarks' peak column)
from kdfast.models import import_bitsandbytes

# The peers (Liger-Kernel, TRL) import transformers' trainer modules, which import peft and so bitsandbytes, whose
# import asks the Hub for a kernel: import it first, offline, as kdfast does.
import_bitsandbytes()

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug(device: torch.device) -> str:
    """'cpu', 'h100', 'h200', ...: the suffix of a results file."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "a10g", "l4", "4090", "3090"):
        if tag in name:
            return tag
    return name.replace(" ", "-")


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _kdfast_version() -> str:
    """The package version and, in a git checkout, its commit (the GPU check runs from a source tree)."""
    import kdfast

    root = Path(kdfast.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{kdfast.__version__} ({commit})" if commit else kdfast.__version__


def environment(device: torch.device) -> dict[str, str]:
    """What the numbers were measured on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} threads")
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": name,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger-kernel": _version("liger-kernel"),
        "kdfast": _kdfast_version(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 7,
              max_seconds: float = 30.0) -> float:
    """Median wall time of fn() in milliseconds (device-synchronized); stops early after max_seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * src.numel() / (ms / 1e3)


def write_table(name: str, device: torch.device, title: str, header: list[str], rows: list[list[object]],
                notes: list[str] = (), results_dir: Path | None = None) -> Path:
    """Write benchmarks/results/<name>-<device>.md (and $OUT when set) and print it."""
    env = environment(device)
    lines = [f"# {title}", "", "| " + " | ".join(f"{k}: {v}" for k, v in env.items()) + " |", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    lines += [""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    targets = [results_dir or RESULTS]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]))
    path = None
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{device_slug(device)}.md"
        path.write_text(text)
    return targets[0] / f"{name}-{device_slug(device)}.md"


def _fmt(cell: object) -> str:
    if isinstance(cell, float):
        return f"{cell:.3g}" if abs(cell) < 1000 else f"{cell:.0f}"
    return str(cell)


def mib(nbytes: float) -> float:
    return nbytes / 2**20
