"""Every benchmark script imports (the GPU check and `make bench` find them runnable)."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    for key in [k for k in sys.modules if k == "benchmarks" or k.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, key)
    module = importlib.import_module(f"benchmarks.{name}")
    assert Path(module.__file__).parent == ROOT / "benchmarks"
