"""Builds and loads the csrc/ kernels (torch.utils.cpp_extension.load + ninja, cached), and reports active backends.

The first use compiles the C++ (and, when torch has CUDA, the CUDA) sources into a per-user cache keyed by a
hash of the sources and flags, so an edited source rebuilds; later uses load the cached library. A library
built ahead of time by setup.py (KDFAST_BUILD_EXT=1) is used instead when it matches the sources. When no
build can run, `load()` reports why and the ops fall back to torch, with one warning.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import re
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kdfast.store import digest_bytes

NAMESPACE = "kdfast_ext"  # torch.ops.kdfast_ext.*
SOURCES = ("bindings.cpp", "token_stats_cpu.cpp")
CUDA_SOURCES = ("token_stats.cu",)


@dataclass(frozen=True)
class Extension:
    """What `load()` found: `ops` is torch.ops.kdfast_ext when the library is loaded, else None."""

    ops: object | None
    cuda: bool  # the CUDA kernels are in the library
    reason: str  # why the library (or its CUDA part) is missing; "" when all of it is there
    origin: str  # "jit <build dir>", "aot <path>" or ""


def source_dir() -> Path | None:
    """csrc/ of a source checkout, or kdfast/csrc/ where setup.py copied it into an installed package."""
    here = Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if all((folder / s).is_file() for s in SOURCES + CUDA_SOURCES):
            return folder
    return None


def sources_hash(folder: Path) -> str:
    """A short hash of the kernel sources' contents: it names the build and dates an ahead-of-time build."""
    return digest_bytes(b"".join(name.encode() + b"\0" + (folder / name).read_bytes()
                                 for name in SOURCES + CUDA_SOURCES), 16)


def cxx_flags(with_cuda: bool, digest: str) -> list[str]:
    """C++ flags (shared with setup.py); torch adds the language standard its headers need. -march=native is
    right because the build runs on the machine that runs it (JIT, or `pip install` from source); a wheel
    built to ship elsewhere must drop it."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", f"-DKDFAST_SOURCE_HASH={digest}"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native")
    if with_cuda:
        flags.append("-DKDFAST_WITH_CUDA")
    return flags


def cuda_flags() -> list[str]:
    """nvcc flags: machine code for the visible GPU's architecture (sm_90 on H100/H200) plus its PTX, so a
    newer GPU can still JIT it. Naming -gencode stops torch from adding its own architecture list."""
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    arch = f"{major}{minor}"
    return ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            f"-gencode=arch=compute_{arch},code=compute_{arch}"]


def cache_dir() -> Path:
    """$KDFAST_EXT_DIR, else $XDG_CACHE_HOME/kdfast/ext, else ~/.cache/kdfast/ext."""
    if os.environ.get("KDFAST_EXT_DIR"):
        return Path(os.environ["KDFAST_EXT_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdfast" / "ext"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes (pytest-xdist workers building at once). fcntl locks die with their
    process, unlike torch's lock file, so a killed build never blocks the next one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file still serializes the build
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_error(exc: BaseException) -> str:
    """One line naming why a build failed: the compiler's first error line when there is one."""
    text = str(exc)
    for line in text.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return f"build failed: {line.strip()[:300]}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:300]}"


def _toolchain_problem() -> str:
    """Why a JIT build cannot start (missing compiler or ninja), or ""."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (set CXX)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        # `pip install ninja` puts the binary in the module's folder; torch looks only on PATH.
        spec = importlib.util.find_spec("ninja")
        if spec is not None:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        if not cpp_extension.is_ninja_available():
            return "ninja is not installed (pip install ninja)"
    return ""


def _jit(folder: Path, with_cuda: bool, digest: str) -> str:
    """Build (or find in the cache) and load the library; returns its build directory."""
    from torch.utils import cpp_extension

    flags = cxx_flags(with_cuda, digest)
    cflags = cuda_flags() if with_cuda else []
    what = (digest, flags, cflags, torch.__version__, sys.version_info[:2])
    key = digest_bytes(repr(what).encode(), 12)
    name = f"kdfast_ext_{key}"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(folder / s) for s in SOURCES + (CUDA_SOURCES if with_cuda else ())]
    with _file_lock(cache_dir() / f"{name}.lock"):
        cpp_extension.load(name=name, sources=sources, build_directory=str(build), extra_cflags=flags,
                           extra_cuda_cflags=cflags, extra_ldflags=["-fopenmp"], is_python_module=False,
                           verbose=os.environ.get("KDFAST_EXT_VERBOSE") == "1")
    return f"jit {build}"


def _aot(digest: str | None, want_cuda: bool) -> str:
    """Load the library setup.py built (kdfast/_C*.so) if it matches the sources; returns its path or ""."""
    spec = importlib.util.find_spec("kdfast._C")
    if spec is None or not spec.origin:
        return ""
    stamp = Path(spec.origin).with_name("_C.sources")
    kinds, _, built = stamp.read_text().strip().partition(" ") if stamp.is_file() else ("", "", "")
    if digest is not None and built != digest or want_cuda and kinds != "cpu+cuda":
        return ""
    torch.ops.load_library(spec.origin)
    return f"aot {spec.origin}"


_lock = threading.Lock()
_state: Extension | None = None


def load() -> Extension:
    """Load the kernels once per process (building them the first time); never raises."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
            if _state.reason:
                what = "its CUDA kernels are" if _state.ops is not None else "it is"
                warnings.warn(f"kdfast: C++/CUDA extension not fully available ({_state.reason}); {what} replaced "
                              "by the chunked torch path", RuntimeWarning, stacklevel=3)
        return _state


def _load() -> Extension:
    if os.environ.get("KDFAST_NO_EXT") == "1":
        return Extension(None, False, "disabled by KDFAST_NO_EXT=1", "")
    folder = source_dir()
    digest = sources_hash(folder) if folder else None
    want_cuda = torch.cuda.is_available()
    try:
        origin = _aot(digest, want_cuda)
    except (OSError, RuntimeError) as exc:
        origin, aot_error = "", _build_error(exc)
    else:
        aot_error = ""
    if origin:
        return _loaded(origin, want_cuda, "")
    if folder is None:
        return Extension(None, False, aot_error or "no csrc/ sources and no ahead-of-time build", "")
    problem = _toolchain_problem()
    if problem:
        return Extension(None, False, problem, "")
    from torch.utils import cpp_extension

    cuda_reason = ""
    if want_cuda and cpp_extension.CUDA_HOME is None:
        want_cuda, cuda_reason = False, "nvcc not found (CUDA_HOME unset), CUDA kernels not built"
    try:
        return _loaded(_jit(folder, want_cuda, digest), want_cuda, cuda_reason)
    except Exception as exc:  # a failed build must not break import: report it and fall back
        reason = _build_error(exc)
    if not want_cuda:
        return Extension(None, False, reason, "")
    try:  # the CUDA half failed: keep the CPU kernels
        return _loaded(_jit(folder, False, digest), False, f"CUDA build failed ({reason})")
    except Exception as exc:
        return Extension(None, False, _build_error(exc), "")


def _loaded(origin: str, with_cuda: bool, reason: str) -> Extension:
    ops = getattr(torch.ops, NAMESPACE)
    has_cuda = ops.ext_info().startswith("cpu+cuda")
    if with_cuda and not has_cuda and not reason:
        reason = "the library was built without CUDA"
    return Extension(ops, has_cuda, reason, origin)


# backends(): each feature registers a reporter returning what it would run now, e.g. "cpp" or "torch".
_REPORTERS: dict[str, Callable[[], str]] = {}


def register_backend(key: str, reporter: Callable[[], str]) -> None:
    """Add a `kdfast.backends()` entry (ops modules call this at import)."""
    _REPORTERS[key] = reporter


def backends() -> dict[str, str]:
    """What is active, e.g. {"token_stats": "cpp", "extension": "cpu (jit ...)", "triton": "interpreter"}.

    Loads (and on first use builds) the extension.
    """
    return {key: report() for key, report in _REPORTERS.items()}


def _report_extension() -> str:
    ext = load()
    if ext.ops is None:
        return f"unavailable: {ext.reason}"
    kinds = "cpu+cuda" if ext.cuda else "cpu"
    return f"{kinds} ({ext.origin})" + (f"; {ext.reason}" if ext.reason else "")


def _report_triton() -> str:
    from kdfast.runtime import triton_interpreting  # not at the top: setup.py loads this file without kdfast

    if importlib.util.find_spec("triton") is None:
        return "unavailable"
    if triton_interpreting():
        return "interpreter"
    return "compiled" if torch.cuda.is_available() else "unavailable"


register_backend("extension", _report_extension)
register_backend("triton", _report_triton)
