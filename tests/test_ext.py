"""The csrc/ build: nvcc accepts the CUDA source, the CUDA glue compiles, the JIT build loads, falls back and locks."""
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import kdfast
from kdfast import _ext

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CI_LIKE = sys.platform == "linux" and platform.machine() == "x86_64"  # CI machines have nvcc and g++


def _nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDA_HOME") and f"{os.environ['CUDA_HOME']}/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_cuda_source_compiles_for_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        if CI_LIKE:
            pytest.fail("nvcc not found: CI must compile csrc/token_stats.cu (install the CUDA toolkit)")
        pytest.skip("nvcc not found")
    # torch's own nvcc flags (half/bf16 operator switches, relaxed constexpr) plus ours, as load() passes them
    cmd = [nvcc, "-c", str(CSRC / "token_stats.cu"), "-o", str(tmp_path / "token_stats.o"), "-std=c++17",
           "-Xcompiler", "-fPIC", *cpp_extension.COMMON_NVCC_FLAGS, *_ext.cuda_flags()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]


def test_cuda_glue_compiles(tmp_path):
    """bindings.cpp with KDFAST_WITH_CUDA: a syntax check against torch's c10/cuda headers and the CUDA runtime
    headers, so the GPU machine's first build does not meet a typo. The CPU wheel lacks one generated header,
    which the C10_CUDA_NO_CMAKE_CONFIGURE_FILE switch skips."""
    nvcc = _nvcc()
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
             nvcc and Path(nvcc).resolve().parent.parent, "/usr/local/cuda")  # nvcc may be a wrapper script
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include/cuda_runtime_api.h").is_file()]
    cuda_include = found[0] if found else None
    torch_include = Path(cpp_extension.include_paths()[0])
    if cuda_include is None or not (torch_include / "c10/cuda").is_dir():
        if CI_LIKE:
            pytest.fail("CUDA runtime headers or torch's c10/cuda headers not found")
        pytest.skip("no CUDA headers")
    cmd = [os.environ.get("CXX", "c++"), "-fsyntax-only", "-std=c++17", "-DKDFAST_WITH_CUDA",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DKDFAST_SOURCE_HASH=test", f"-I{cuda_include}",
           *(f"-I{p}" for p in cpp_extension.include_paths()), str(CSRC / "bindings.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-4000:]


def test_backends_report_the_extension():
    b = kdfast.backends()
    assert {"token_stats", "extension", "triton"} <= set(b)
    assert b["token_stats"] in ("cpp", "cuda", "torch")
    assert b["triton"] in ("compiled", "interpreter", "unavailable")
    if os.environ.get("KDFAST_NO_EXT") == "1":
        assert b["extension"].startswith("unavailable") and b["token_stats"] == "torch"
    elif CI_LIKE:  # a compiler is there: the build must have worked, from the current sources
        assert b["extension"].startswith("cpu"), b["extension"]
        assert b["token_stats"] == ("cuda" if torch.cuda.is_available() else "cpp")
        assert _ext.sources_hash(CSRC) in _ext.load().ops.ext_info()


def _run(script: str, env: dict, cwd: Path = ROOT) -> dict:
    """Run a Python snippet in a fresh process (the extension state is per process); it prints one JSON line."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=cwd, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


FALLBACK = """
    import json, warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import kdfast{patch}
        z, y = torch.randn(6, 50), torch.tensor([1, 2, 3, 4, 5, -100])
        st = kdfast.token_stats(z, y)
        kdfast.token_stats(z, y)
        ref = kdfast.reference.token_stats(z.double(), y)
        backends = kdfast.backends()
    msgs = [str(w.message) for w in caught if "extension" in str(w.message)]
    ok = torch.allclose(st.logp.double(), ref["logp"], atol=1e-5)
    print(json.dumps({{"warnings": msgs, "backends": backends, "ok": ok}}))
"""


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    out = _run(FALLBACK.format(patch=""), {"CXX": str(tmp_path / "no-such-c++"), "KDFAST_EXT_DIR": str(tmp_path)})
    assert len(out["warnings"]) == 1 and "no C++ compiler" in out["warnings"][0], out
    assert out["backends"]["token_stats"] == "torch" and "no C++ compiler" in out["backends"]["extension"]
    assert out["ok"]


def test_build_error_falls_back_naming_the_error(tmp_path):
    broken = tmp_path / "csrc"
    shutil.copytree(CSRC, broken)
    for name in ("bindings.cpp", "token_stats_cpu.cpp"):  # both, so that ninja stops at once
        (broken / name).write_text('#include "planted_by_test_ext.h"\n' + (broken / name).read_text())  # fatal
    patch = f"\n        import kdfast._ext, pathlib; kdfast._ext.source_dir = lambda: pathlib.Path({str(broken)!r})"
    out = _run(FALLBACK.format(patch=patch), {"KDFAST_EXT_DIR": str(tmp_path / "cache")})
    assert len(out["warnings"]) == 1, out
    assert "build failed" in out["warnings"][0] and "planted_by_test_ext.h" in out["warnings"][0], out
    assert out["backends"]["token_stats"] == "torch"
    assert out["ok"]


def test_two_processes_build_and_load_at_once(tmp_path):
    """Two workers meeting an empty cache: one builds under the lock, the other waits and loads the result."""
    script = """
        import json, torch, kdfast
        st = kdfast.token_stats(torch.randn(3, 40), torch.tensor([1, 2, 3]), backend="cpp")
        print(json.dumps({"extension": kdfast.backends()["extension"]}))
    """
    env = {**os.environ, "KDFAST_EXT_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-4000:]
        assert json.loads(stdout.strip().splitlines()[-1])["extension"].startswith("cpu")
    assert len(list(tmp_path.glob("kdfast_ext_*/*.so"))) == 1
