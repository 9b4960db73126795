"""The optional native expert kernel (mobilemoe/native/q4_experts.c, mobilemoe/native_experts.py);
everything else about the package is in pyproject.toml.

It is plain C loaded with ctypes, built on x86-64 Linux only; `optional=True` lets an install
without a C compiler go on (experts then run on ONNX Runtime sessions)."""

import platform
import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64"):
    extensions.append(Extension(
        "mobilemoe._q4_experts", ["mobilemoe/native/q4_experts.c"],
        # no fused multiply-adds where C code adds weighted expert outputs: the sum must round
        # as numpy's does (mm_q4_silu_experts_sum)
        extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off"],
        libraries=["m", "pthread"], optional=True))

setup(ext_modules=extensions)
