"""The one build rule of the compiled extension (csrc/), shared by setup.py and the JIT build of extension.py.

setup.py cannot import the package (it runs before the package is installed), so it loads this file by path: keep it
free of package imports; torch is imported only inside the functions that need it.

The compiler flags name no instruction set: the extension is compiled for the compiler's baseline (x86-64 on x86),
so one build runs on any CPU of the architecture. The AVX2 and AVX-512 kernels are compiled in target regions
(csrc/cpu_target.h) and chosen at run time by cpuid (csrc/cpu_isa.h); ``GENKNOWSUB_FAST_CPU_ISA`` forces one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXTENSION_SWITCH = "GENKNOWSUB_FAST_EXTENSION"
ISA_SWITCH = "GENKNOWSUB_FAST_CPU_ISA"
ISA_CHOICES = ("auto", "scalar", "avx2", "avx512")
# CUDA-only sources: part of the setup.py build when torch has CUDA, never of the CPU JIT build.
CUDA_ONLY_SOURCES = ("prototypes_cuda.cu", "prototypes_cuda_binding.cpp")
_OFF = ("off", "0", "false", "no")


def extension_disabled(environ: dict | None = None) -> bool:
    """True when ``GENKNOWSUB_FAST_EXTENSION`` is off / 0 / false / no (case and spaces ignored)."""
    env = os.environ if environ is None else environ
    return env.get(EXTENSION_SWITCH, "").strip().lower() in _OFF


def openmp() -> bool:
    """Whether to compile with -fopenmp: at::parallel_for is a header template and runs serially without it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.backends.openmp.is_available())


def cxx_flags() -> list[str]:
    """Compiler flags for the C++ sources: -O3, -fopenmp where torch uses OpenMP, and no -m<isa> flag."""
    return ["-O3"] + (["-fopenmp"] if openmp() else [])


def link_flags() -> list[str]:
    """Linker flags matching :func:`cxx_flags`."""
    return ["-fopenmp"] if openmp() else []


def cpu_sources(csrc: Path) -> list[Path]:
    """The C++ sources of the CPU build (everything in csrc/ but the CUDA-only files), sorted."""
    return sorted(p for p in csrc.glob("*.cpp") if p.name not in CUDA_ONLY_SOURCES)


def cuda_sources(csrc: Path) -> list[Path]:
    """The sources that only a CUDA build adds."""
    return sorted(csrc.glob("*.cu")) + [csrc / n for n in CUDA_ONLY_SOURCES if n.endswith(".cpp")]
