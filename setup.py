"""Packaging. By default kdfast installs as pure Python and kdfast._ext builds the kernels on first use.

`KDFAST_BUILD_EXT=1 pip install --no-build-isolation .` builds them here instead, as kdfast._C: the C++ kernels,
plus the CUDA ones when torch has CUDA and nvcc is found (torch must be importable, hence no build isolation).
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPy(build_py):
    """Ship csrc/ inside the package (kdfast/csrc/) so an installed kdfast can still build on first use."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "kdfast" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / "csrc").iterdir():
            if src.suffix in (".cpp", ".cu", ".h"):
                shutil.copy2(src, target / src.name)


def _ext_module():
    """kdfast/_ext.py loaded by path (importing kdfast itself would pull in all of it): the one place that
    holds the sources and compiler flags."""
    # Its one import from kdfast, the store's digest, is loaded by path too and found under its own name.
    store = importlib.util.spec_from_file_location("kdfast.store", ROOT / "kdfast" / "store.py")
    sys.modules[store.name] = importlib.util.module_from_spec(store)
    store.loader.exec_module(sys.modules[store.name])
    spec = importlib.util.spec_from_file_location("_kdfast_ext_build", ROOT / "kdfast" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("KDFAST_BUILD_EXT") != "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit("KDFAST_BUILD_EXT=1 needs torch in the build environment: "
                         "pip install --no-build-isolation .") from exc
    ext = _ext_module()
    digest = ext.sources_hash(ROOT / "csrc")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    names = ext.SOURCES + (ext.CUDA_SOURCES if with_cuda else ())
    make = CUDAExtension if with_cuda else CppExtension
    args = {"cxx": ext.cxx_flags(with_cuda, digest)}
    if with_cuda:
        args["nvcc"] = ext.cuda_flags()
    module = make("kdfast._C", [f"csrc/{n}" for n in names], extra_compile_args=args, extra_link_args=["-fopenmp"])
    stamp = f"{'cpu+cuda' if with_cuda else 'cpu'} {digest}\n"

    class BuildExt(BuildExtension):
        """Also write _C.sources beside the library: kdfast._ext uses the library only while it matches csrc/."""

        def run(self):
            super().run()
            Path(self.get_ext_fullpath("kdfast._C")).with_name("_C.sources").write_text(stamp)

    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildExt}}


extra = _extensions()
setup(cmdclass={"build_py": BuildPy, **extra.pop("cmdclass", {})}, **extra)
