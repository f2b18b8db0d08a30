"""How much memory this process may still use, so that a command can refuse a model that would not fit before it
starts building it (instead of being killed half-way)."""

from __future__ import annotations

import os


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) and anything unexpected: unknown


def available_bytes() -> int | None:
    """The smaller of the system's available memory (``MemAvailable`` in /proc/meminfo) and what the process's cgroup
    limit leaves (cgroup v2 ``memory.max`` less ``memory.current``, or v1 ``memory.limit_in_bytes`` less
    ``memory.usage_in_bytes``); None where neither can be read (non-Linux systems)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(os.path.join("/sys/fs/cgroup", limit_file))
        usage = _read_int(os.path.join("/sys/fs/cgroup", usage_file))
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for "no limit"
            found.append(max(0, limit - usage))
            break
    return min(found) if found else None


def human_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size (``"15.3 GB"``, ``"312 MB"``)."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def check_fits(need: int, what: str, hint: str = "") -> str:
    """``what`` (a description of something that needs ``need`` bytes), or ValueError ``"<what>, but only <free> of
    memory is available; <hint>"`` when :func:`available_bytes` says it would not fit (nothing is refused where that
    is unknown). Commands call it before they build anything big."""
    free = available_bytes()
    if free is not None and need > free:
        raise ValueError(f"{what}, but only {human_bytes(free)} of memory is available" + (f"; {hint}" if hint else ""))
    return what


def device_available_bytes(device) -> int | None:
    """Free memory on ``device`` (a torch device): :func:`available_bytes` for the CPU, the driver's free memory for
    CUDA; None where unknown."""
    if device.type == "cpu":
        return available_bytes()
    if device.type == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    return None


def check_device_fits(need: int, device, what: str, hint: str = "") -> str:
    """As :func:`check_fits`, for memory on ``device`` (the CPU or a CUDA device)."""
    free = device_available_bytes(device)
    if free is not None and need > free:
        where = "" if device.type == "cpu" else f" on {device}"
        raise ValueError(
            f"{what}, but only {human_bytes(free)} of memory is available{where}" + (f"; {hint}" if hint else "")
        )
    return what


__all__ = ["available_bytes", "device_available_bytes", "human_bytes", "check_fits", "check_device_fits"]
