"""Packaging; the C++ extension is built on first use by kdfast._ext (set KDFAST_BUILD_EXT=1 to build it here)."""
from setuptools import setup

setup()
