"""Scale: the Arrow paper's 256 experts of rank 16 on Phi-3-mini shapes (a few layers, bf16): what loading, patching
and building such a library cost in time and resident memory. Every measurement runs in a fresh process, so its
resident memory (RSS) holds nothing from earlier cases.

- load: a random Phi-3-mini with ``layers`` layers in bf16 is built first; then, from a baseline taken after a base
  forward (``/proc/self/clear_refs`` resets the peak), ``LoraLibrary.load`` → ``patch_model`` → one forward of 16
  tokens. Recorded: load and patch seconds, extra RSS after the forward, the same after the library object is
  deleted, and the peak extra RSS, all in bytes (the report divides them by the library file's bytes).
- build: ``LoraLibrary.from_adapters(task, general, gks="param", dtype=bfloat16)`` then ``save``, what
  ``genknowsub-fast build`` runs, from bf16 PEFT adapter directories whose files were just written (warm page
  cache). Recorded: seconds, peak extra RSS, the input, output and largest adapter's bytes. (bf16 adapters keep the
  4-layer build's memory within a shared machine's means: 1.5 GiB of inputs rather than 3 GiB in fp32.)

The adapters: one written by PEFT (``synthetic.write_adapters`` on a one-layer Phi-3-mini-shaped model) is the
template of the others, which reuse its config and tensor names for ``layers`` layers, with random factors.

    python -m benchmarks.scale adapters DIR --layers 4          # 256 task + 3 general adapters into DIR
    python -m benchmarks.scale build DIR LIBRARY --layers 4     # prints one JSON line
    python -m benchmarks.scale load LIBRARY --layers 4          # prints one JSON line

``benchmarks/test_scale.py`` runs these as pytest-benchmark cases.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXPERTS, GENERAL, RANK = 256, 3, 16
ADAPTER_DTYPE_NAME = "bfloat16"
PROMPT = 16
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------ memory (Linux)
def status() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS since the last reset), RssAnon and RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> dict[str, int]:
    """Reset the peak RSS to the current RSS (``/proc/self/clear_refs``) and return the status after the reset."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status()


def can_measure() -> str | None:
    """None when this machine can measure resident memory and its peak per step, else why not."""
    try:
        reset_peak()
    except OSError as exc:
        return f"needs Linux's /proc/self/status and a writable /proc/self/clear_refs ({exc})"
    return None


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------------------ inputs
def phi3_mini_config(layers: int, vocab: int | None = None):
    """Phi-3-mini's config (random model) with ``layers`` decoder layers (and, when given, a smaller vocabulary)."""
    from genknowsub_fast.synthetic import phi3_config

    cfg = phi3_config("phi3-mini")
    cfg.num_hidden_layers = layers
    if vocab is not None:
        cfg.vocab_size = vocab
    return cfg


def make_model(layers: int, vocab: int | None = None):
    """A random Phi-3-mini-shaped model with ``layers`` layers, created directly in bf16 (no float32 copy)."""
    import torch
    from transformers import Phi3ForCausalLM

    cfg = phi3_mini_config(layers, vocab)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        return Phi3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)


def model_bytes(layers: int) -> int:
    """Bytes of :func:`make_model` ``(layers)``'s parameters (counted on the meta device)."""
    import torch
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(phi3_mini_config(layers))
    return 2 * sum(p.numel() for p in model.parameters())


def write_adapters(out_dir: str | Path, layers: int, experts: int = EXPERTS, general: int = GENERAL,
                   rank: int = RANK, progress=print) -> tuple[list[str], list[str]]:  # fmt: skip
    """``experts`` task and ``general`` general bf16 adapters of ``rank`` on all four Phi-3-mini targets of ``layers``
    layers, in PEFT's format (see the module docstring); returns their directories."""
    import warnings

    import torch
    from safetensors.torch import load_file, save_file

    ADAPTER_DTYPE = getattr(torch, ADAPTER_DTYPE_NAME)  # noqa: N806

    from genknowsub_fast.synthetic import write_adapters as peft_write

    out = Path(out_dir)
    template = out / "template"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_write(make_model(1, vocab=512), template, 1, 0, rank=rank)
    tdir = template / "task_0"
    tensors = load_file(str(tdir / "adapter_model.safetensors"))
    if not all(".layers.0." in k for k in tensors):
        raise ValueError(f"unexpected tensor names in the template adapter: {sorted(tensors)[:4]}")
    shapes = {k.replace(".layers.0.", f".layers.{i}."): v.shape for k, v in tensors.items() for i in range(layers)}
    gen = torch.Generator().manual_seed(0)
    dirs: dict[str, list[str]] = {"task": [], "general": []}
    names = [("task", f"task_{i}") for i in range(experts)] + [("general", f"general_{g}") for g in range(general)]
    t0 = time.perf_counter()
    for n, (kind, name) in enumerate(names):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(tdir / "adapter_config.json", d / "adapter_config.json")
        factors = {}
        for key, shape in shapes.items():
            fan_in = shape[1]
            scale = 0.05 if kind == "general" else 1.0
            factors[key] = (torch.randn(shape, generator=gen) * (scale / fan_in**0.5)).to(ADAPTER_DTYPE)
        save_file(factors, str(d / "adapter_model.safetensors"))
        dirs[kind].append(str(d))
        if (n + 1) % 64 == 0 or n + 1 == len(names):
            progress(f"adapters: {n + 1}/{len(names)} written ({time.perf_counter() - t0:.0f} s)")
    shutil.rmtree(template)
    return dirs["task"], dirs["general"]


def adapter_bytes(dirs: list[str]) -> list[int]:
    return [os.path.getsize(os.path.join(d, "adapter_model.safetensors")) for d in dirs]


# ------------------------------------------------------------------------------------------------------ measurements
def measure_build(task: list[str], general: list[str], output: str) -> dict:
    """Build and save the bf16 library from the adapters (this process); seconds and peak extra RSS."""
    import torch

    from genknowsub_fast import LoraLibrary
    from genknowsub_fast.backends import extension

    extension.status()  # load the compiled extension before the baseline
    base = reset_peak()
    t0 = time.perf_counter()
    lib = LoraLibrary.from_adapters(task, general, gks="param", dtype=torch.bfloat16)
    lib.save(output)
    seconds = time.perf_counter() - t0
    peak = status()["VmHWM"] - base["VmRSS"]
    inputs = adapter_bytes(task + general)
    return {
        "build_s": seconds,
        "peak_extra": peak,
        "input_bytes": sum(inputs),
        "one_adapter_bytes": max(inputs),
        "output_bytes": os.path.getsize(output),
    }


def measure_load(library: str, layers: int) -> dict:
    """Load the library, patch a fresh random model with it and run one forward (this process); see the module
    docstring for what is recorded."""
    import torch

    import genknowsub_fast as gkf
    from benchmarks.machine import kernel_isa
    from genknowsub_fast import patching  # noqa: F401  (imported before the baseline)

    model = make_model(layers)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    isa = kernel_isa()  # also loads the compiled extension before the baseline
    with torch.no_grad():
        model(ids)
    base = reset_peak()
    t0 = time.perf_counter()
    lib = gkf.LoraLibrary.load(library)
    t1 = time.perf_counter()
    gkf.patch_model(model, lib)
    t2 = time.perf_counter()
    with torch.no_grad():
        model(ids)
    t3 = time.perf_counter()
    after = status()
    del lib
    gc.collect()
    after_del = status()
    return {
        "load_s": t1 - t0,
        "patch_s": t2 - t1,
        "forward_s": t3 - t2,
        "extra_rss": after["VmRSS"] - base["VmRSS"],
        "extra_rss_anon": after["RssAnon"] - base["RssAnon"],
        "extra_rss_file": after["RssFile"] - base["RssFile"],
        "extra_rss_after_del": after_del["VmRSS"] - base["VmRSS"],
        "peak_extra": after["VmHWM"] - base["VmRSS"],
        "isa": isa,
    }


def in_subprocess(*args: str, timeout: float = 1800) -> dict:
    """Run ``python -m benchmarks.scale ARGS`` in a fresh process and return the JSON line it prints."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.scale {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("adapters", help="write the task and general adapters")
    p.add_argument("dir")
    p.add_argument("--layers", type=int, default=4)
    p = sub.add_parser("build", help="measure the build of the library from DIR's adapters")
    p.add_argument("dir")
    p.add_argument("library")
    p = sub.add_parser("load", help="measure load + patch + forward of LIBRARY")
    p.add_argument("library")
    p.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("GKF_BENCH_THREADS", min(2, os.cpu_count() or 1))))
    if args.what == "adapters":
        task, general = write_adapters(args.dir, args.layers, progress=lambda m: print(m, file=sys.stderr))
        print(json.dumps({"task": task, "general": general}))
    elif args.what == "build":
        d = Path(args.dir)
        task = sorted((str(p) for p in d.glob("task_*")), key=lambda s: int(s.rsplit("_", 1)[1]))
        general = sorted(str(p) for p in d.glob("general_*"))
        print(json.dumps(measure_build(task, general, args.library)))
    else:
        print(json.dumps(measure_load(args.library, args.layers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
