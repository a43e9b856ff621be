"""Run the CPU benchmarks of a source checkout (benchmarks/run_cpu.py); tables go to benchmarks/results/."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2]),
                        help="the kdfast source checkout holding benchmarks/ (default: this package's)")


def main(args: argparse.Namespace) -> int:
    script = Path(args.root) / "benchmarks" / "run_cpu.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: the benchmarks ship with the source tree; "
                                "clone kdfast and pass --root to it")
    return subprocess.run([sys.executable, str(script)], cwd=args.root).returncode
