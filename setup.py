"""Build script: the package itself is described in pyproject.toml; this file only adds the optional extension.

The compiled prototype extension (csrc/) is built here when torch is importable at build time (install with
``pip install --no-build-isolation -e .``). Without it the package still installs and works: the extension is then
JIT-built on first use, or the torch.linalg path runs with a one-line notice.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CUDA_ONLY = ("prototypes_cuda_binding.cpp",)


def _host_cflags() -> list[str]:
    # Same rule as genknowsub_fast/backends/extension.py::host_cflags (setup.py cannot import the package).
    # at::parallel_for is a header template: without -fopenmp it runs serially.
    flags = ["-O3"]
    if sys.platform.startswith("linux"):
        try:
            import torch

            if torch.backends.openmp.is_available():
                flags.append("-fopenmp")
        except ImportError:
            pass
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        words = set()
    if {"avx2", "fma"} <= words:
        flags += ["-mavx2", "-mfma"]
    return flags


def extension_modules() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the optional csrc/ extension; empty when it cannot be built here.

    Builds ``genknowsub_fast._C`` (a shared library of torch ops, loaded with torch.ops.load_library): the CPU sources,
    plus the CUDA kernel and its binding when torch has CUDA and a CUDA toolkit is found. A failed build prints one
    line and the install goes on (the package then JIT-builds on first use or runs its torch path).
    ``GENKNOWSUB_FAST_EXTENSION=off`` skips the build.
    """
    if os.environ.get("GENKNOWSUB_FAST_EXTENSION", "").strip().lower() in ("off", "0", "false", "no"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    csrc = ROOT / "csrc"
    cpp = sorted(f"csrc/{p.name}" for p in csrc.glob("*.cpp") if p.name not in CUDA_ONLY)
    if not cpp:
        return [], {}
    cflags = _host_cflags()
    if torch.version.cuda and CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = CUDAExtension(
            "genknowsub_fast._C",
            cpp + sorted(f"csrc/{p.name}" for p in csrc.glob("*.cu")) + [f"csrc/{n}" for n in CUDA_ONLY],
            include_dirs=[str(csrc)],
            extra_compile_args={"cxx": cflags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cflags else [],
        )
    else:
        ext = CppExtension(
            "genknowsub_fast._C",
            cpp,
            include_dirs=[str(csrc)],
            extra_compile_args=cflags,
            extra_link_args=["-fopenmp"] if "-fopenmp" in cflags else [],
        )

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - the extension is optional
                why = " ".join(str(exc).split())[:300]
                print(
                    f"genknowsub_fast: C++ extension not built ({type(exc).__name__}: {why}); it is JIT-built on "
                    "first use or the torch path runs",
                    file=sys.stderr,
                )

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
