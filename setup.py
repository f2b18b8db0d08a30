"""Build script: the package itself is described in pyproject.toml; this file only adds the optional extension.

The compiled prototype extension (csrc/) is built here when torch is importable at build time (install with
``pip install --no-build-isolation -e .``). Without it the package still installs and works: the extension is then
JIT-built on first use, or the torch.linalg path runs with a one-line notice.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_rule():
    """genknowsub_fast/backends/build_rule.py, loaded by path: the package is not importable while it is being built."""
    path = ROOT / "genknowsub_fast" / "backends" / "build_rule.py"
    spec = importlib.util.spec_from_file_location("_genknowsub_fast_build_rule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rule = _load_build_rule()


def extension_modules() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the optional csrc/ extension; empty when it cannot be built here.

    Builds ``genknowsub_fast._C`` (a shared library of torch ops, loaded with torch.ops.load_library): the CPU sources,
    plus the CUDA kernel and its binding when torch has CUDA and a CUDA toolkit is found. The flags are those of
    genknowsub_fast/backends/build_rule.py (no instruction-set flag: the vector kernels are chosen at run time). A
    failed build prints one line and the install goes on (the package then JIT-builds on first use or runs its torch
    path).
    ``GENKNOWSUB_FAST_EXTENSION=off`` skips the build.
    """
    if rule.extension_disabled():
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    csrc = ROOT / "csrc"
    cpp = [f"csrc/{p.name}" for p in rule.cpu_sources(csrc)]
    if not cpp:
        return [], {}
    cflags = rule.cxx_flags()
    if torch.version.cuda and CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = CUDAExtension(
            "genknowsub_fast._C",
            cpp + [f"csrc/{p.name}" for p in rule.cuda_sources(csrc)],
            include_dirs=[str(csrc)],
            extra_compile_args={"cxx": cflags, "nvcc": ["-O3"]},
            extra_link_args=rule.link_flags(),
        )
    else:
        ext = CppExtension(
            "genknowsub_fast._C",
            cpp,
            include_dirs=[str(csrc)],
            extra_compile_args=cflags,
            extra_link_args=rule.link_flags(),
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
