"""What a benchmark number was measured on: the CPU as the OS, torch and the compiled kernel see it, the GPU, versions.

Machines that run these benchmarks differ: some expose AVX-512 with BF16, others AVX2 only (the OS may hide a host
CPU's AVX-512), and a bf16 matmul is ~10× faster on the former, so every result records which ISA it ran on.
"""

from __future__ import annotations

import os
import platform

# /proc/cpuinfo flags that decide which kernels can run.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_name_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its flags, from /proc/cpuinfo (the processor name and no flags elsewhere)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return name, flags


def kernel_isa() -> str:
    """The instruction set the routed CPU kernel uses now (``cpu_kernel.isa()``), or why there is none."""
    from genknowsub_fast.backends import cpu_kernel

    try:
        return cpu_kernel.isa()
    except ValueError as exc:
        return f"none: torch path ({exc})"


def machine() -> dict:
    """The CPU (name, cores, flags, AVX-512 / AVX-512-BF16 visible, torch's capability, the routed kernel's ISA and
    a forced one) and the GPU, if any."""
    import torch

    name, flags = cpu_name_and_flags()
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_isa": kernel_isa(),
        "kernel_isa_forced": os.environ.get("GENKNOWSUB_FAST_CPU_ISA") or None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def describe(m: dict | None = None) -> str:
    """One phrase naming the CPU, whether AVX-512 / AVX-512-BF16 are visible, torch's capability and the routed
    kernel's ISA (of :func:`machine`'s record ``m``, this machine's by default): what a measured number ran on."""
    m = machine() if m is None else m
    yes = {True: "yes", False: "no"}
    forced = f", forced by GENKNOWSUB_FAST_CPU_ISA={m['kernel_isa_forced']}" if m.get("kernel_isa_forced") else ""
    return (
        f"{m['cpu']} ({m['cores']} cores; AVX-512 visible: {yes[m['avx512']]}, AVX-512-BF16 visible: "
        f"{yes[m['avx512_bf16']]}; torch sees {m['torch_cpu_capability']}; routed kernel ISA {m['kernel_isa']}{forced})"
    )


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def versions() -> dict:
    """Versions of what the benchmarks run (torch, triton, PEFT, transformers, Python) and torch's thread count."""
    import torch

    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


__all__ = ["CPU_FLAGS", "cpu_name_and_flags", "describe", "kernel_isa", "machine", "versions"]
