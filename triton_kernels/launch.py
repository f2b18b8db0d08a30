"""The one place kernels are launched, so the exact launches of a call can be recorded instead of run.

``recording()`` collects every launch (kernel, grid, arguments, launch options) of the code it wraps without running
any: ``tools/aot.py`` uses it on meta tensors to compile, for a real GPU architecture, exactly the configurations the
dispatch table produces, on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_recorder: list[Launch] | None = None


@dataclass
class Launch:
    """One kernel launch: positional runtime arguments, constexpr keywords and launch options."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # free label for tooling (aot.py: which problem set recorded it)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return fn.__name__


# CUDA grid limits: 2^31 - 1 blocks on axis 0, 65535 on axes 1 and 2. A larger grid fails at launch on a GPU (and not
# at all in the interpreter), so it is checked here, for recorded launches too.
MAX_GRID = (2**31 - 1, 65535, 65535)


def check_grid(name: str, grid: tuple[int, ...]) -> None:
    """ValueError when ``grid`` exceeds the CUDA limits (see MAX_GRID)."""
    if len(grid) > 3 or grid[0] > MAX_GRID[0] or (len(grid) > 1 and max(grid[1:]) > MAX_GRID[1]):
        raise ValueError(f"{name}: grid {tuple(grid)} exceeds the CUDA limits {MAX_GRID[: len(grid)]}")


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, num_warps: int, num_stages: int = 1, **constexprs: Any):
    """Run ``kernel[grid](*args, **constexprs)`` with the launch options, or record it inside :func:`recording`."""
    check_grid(getattr(getattr(kernel, "fn", kernel), "__name__", "kernel"), grid)
    if _recorder is not None:
        opts = {"num_warps": num_warps, "num_stages": num_stages}
        _recorder.append(Launch(kernel, tuple(grid), tuple(args), dict(constexprs), opts))
        return
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 before their import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .decode import _decode_route_kernel

    return isinstance(_decode_route_kernel, InterpretedFunction)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Record launches instead of running them (not thread-safe; for tooling, never for the hot path)."""
    global _recorder
    prev, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = prev
