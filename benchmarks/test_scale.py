"""Scale: a 256-expert rank-16 library on Phi-3-mini shapes in bf16 (``benchmarks/scale.py``). Each round is a fresh
process: building the library from bf16 PEFT adapters, and loading it, patching a random model with it and running one
forward. Recorded in ``extra_info``: per round, seconds and resident-memory bytes; the summary as multiples of the
library's (or the build's output) bytes, and the targets met or missed:

- load + patch + forward: extra RSS ≤ 1.10× the library's bytes, peak ≤ 1.25×, load + patch ≤ 1 s per GB;
- build: peak ≤ 1.25× the output library plus one adapter, ≤ 2 s per GiB of input adapters.

The 4-layer library is about 1.5 GiB (its bf16 adapters as much); ``-m quick`` runs the 1-layer case only.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import report, scale
from benchmarks.interleave import progress

LAYERS = [pytest.param(1, marks=pytest.mark.quick, id="1-layer"), pytest.param(4, id="4-layers")]
LOAD_ROUNDS = 3
BUILD_ROUNDS = 3


@dataclass
class Files:
    layers: int
    adapters: Path
    library: Path
    task: list[str]
    general: list[str]
    built: bool = False

    @property
    def input_bytes(self) -> int:
        return sum(scale.adapter_bytes(self.task + self.general))


@pytest.fixture(scope="module", params=LAYERS)
def layers(request) -> int:
    """Decoder layers of the case (a module-scoped parameter: pytest runs each value's build and load together)."""
    return request.param


@pytest.fixture(scope="module")
def scale_files(tmp_path_factory):
    """``get(layers)``: the adapters of the ``layers``-layer case (written on first use) and its library path; all
    deleted after the module."""
    why = scale.can_measure()
    if why:
        pytest.skip(f"the scale benchmark {why}")
    root = tmp_path_factory.mktemp("scale")
    cache: dict[int, Files] = {}

    def get(layers: int) -> Files:
        if layers not in cache:
            for other in list(cache.values()):  # one case's files at a time on disk
                shutil.rmtree(other.adapters, ignore_errors=True)
                other.library.unlink(missing_ok=True)
                cache.pop(other.layers)
            d = root / f"adapters_{layers}"
            task, general = scale.write_adapters(d, layers, progress=progress)
            cache[layers] = Files(layers, d, root / f"library_{layers}.safetensors", task, general)
        return cache[layers]

    yield get
    shutil.rmtree(root, ignore_errors=True)


def _need(nbytes: float, what: str) -> None:
    free = scale.available_bytes()
    if free is not None and free < nbytes:
        pytest.skip(f"{what} needs about {nbytes / 2**30:.1f} GiB of free memory, {free / 2**30:.1f} GiB available")


def _record(benchmark, kind: str, name: str, info: dict, rounds: list[dict]) -> None:
    record = {"section": "scale", "kind": kind, "case": name, "isa": rounds[0].get("isa") or info.get("isa"),
              "info": info, "rounds": rounds}  # fmt: skip
    record["summary"] = {k: dict(zip(("median", "min", "max"), v)) for k, v in report.scale_summary(record).items()}
    record["targets"] = [{"target": t, "met": ok} for t, ok in report.scale_verdicts(record)]
    benchmark.group = "scale"
    benchmark.extra_info.update(record)
    progress(f"{name}: " + "; ".join(f"{k} {v['median']:.3g}" for k, v in record["summary"].items()))


def _desc(layers: int) -> str:
    return f"E={scale.EXPERTS} r={scale.RANK}, {layers} layer{'s' * (layers > 1)} of Phi-3-mini, bf16"


def test_scale_build(benchmark, scale_files, layers):
    from benchmarks.machine import kernel_isa

    files = scale_files(layers)
    # The build's peak was about 4.6x its bf16 inputs when this benchmark was written: room for that.
    _need(5 * files.input_bytes + 2**30, "building this library")
    rounds: list[dict] = []
    benchmark.pedantic(
        lambda: rounds.append(scale.in_subprocess("build", str(files.adapters), str(files.library))),
        rounds=BUILD_ROUNDS,
        iterations=1,
    )
    files.built = True
    info = dict(layers=layers, experts=scale.EXPERTS, general=scale.GENERAL, rank=scale.RANK, dtype="bfloat16",
                adapters=len(files.task) + len(files.general), adapter_dtype=scale.ADAPTER_DTYPE_NAME,
                isa=kernel_isa())  # fmt: skip
    name = f"scale build: {scale.EXPERTS} + {scale.GENERAL} general bf16 adapters → {_desc(layers)} library"
    _record(benchmark, "build", name, info, rounds)


def test_scale_load(benchmark, scale_files, layers):
    files = scale_files(layers)
    if not files.built:
        _need(5 * files.input_bytes + 2**30, "building this library")
        scale.in_subprocess("build", str(files.adapters), str(files.library))
        files.built = True
    lib_bytes = files.library.stat().st_size
    _need(scale.model_bytes(layers) + 3 * lib_bytes, "loading this library into a model")
    rounds: list[dict] = []
    benchmark.pedantic(
        lambda: rounds.append(scale.in_subprocess("load", str(files.library), "--layers", str(layers))),
        rounds=LOAD_ROUNDS,
        iterations=1,
    )
    info = dict(layers=layers, experts=scale.EXPERTS, rank=scale.RANK, dtype="bfloat16", library_bytes=lib_bytes,
                prompt=scale.PROMPT)  # fmt: skip
    _record(benchmark, "load", f"scale load + patch + forward: {_desc(layers)}", info, rounds)
