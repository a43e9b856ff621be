"""Run every CPU benchmark in turn (`make bench`); each writes its table to benchmarks/results/<name>-cpu.md.

Run it on a quiet machine: the tables are medians, but two cores shared with other work still skew them.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ["bench_divergence.py", "bench_fused_linear.py", "bench_token_stats.py", "bench_attacks.py",
           "bench_memorization.py", "bench_distill_step.py", "bench_distill_memory.py", "bench_teacher_cache.py"]


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for script in SCRIPTS:
        start = time.time()
        print(f"=== {script}", flush=True)
        if subprocess.run([sys.executable, str(here / script), "--device", "cpu"], cwd=here.parent).returncode:
            failed.append(script)
        print(f"=== {script}: {time.time() - start:.0f} s", flush=True)
    print("failed: " + (", ".join(failed) or "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
