"""Builds distrec's optional C++ CPU kernel (sharding/kernels/_cpu_tbe); the metadata is in setup.cfg.

    pip install --no-deps --no-build-isolation -e .     # `make install`: builds it in place
    python setup.py build_ext --inplace                  # rebuild after editing the C++ source

The extension is optional: without torch in the build environment (build isolation), or when the
compiler fails, the install goes on without it, and the runtime falls back to another kernel and says why
(``distrec doctor`` too). Flags: -O3 and OpenMP (through at::parallel_for); never -march=native, since a
venv or image may move between AMD and Intel machines: AVX2 + FMA on x86-64 only, which both have had
since 2013-2015, and F16C (older still: c10::Half then converts fp16 weights in one instruction).
-ffp-contract=off keeps a multiply and an add two roundings, as the reference's are.
"""
from __future__ import annotations

import platform

from setuptools import setup


def extensions() -> tuple[list, dict]:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not importable at build time: no extension, the runtime falls back
        return [], {}
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    ext = CppExtension("sharding.kernels._cpu_tbe", ["sharding/kernels/csrc/cpu_tbe.cpp"],
                       extra_compile_args=flags, extra_link_args=["-fopenmp"], optional=True)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
