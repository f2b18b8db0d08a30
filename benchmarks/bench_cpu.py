"""The CPU benchmarks of ``make bench``: every case interleaved (base, ours, PEFT alternately inside one measurement),
written as one JSON for ``benchmarks/write_results.py``.

    python -m benchmarks.bench_cpu --json benchmarks/results/latest.json [--repeats 5] [--sections op model ...]

Sections (``--sections``, all by default):
- ``op``: one Phi-3-mini linear (qkv, o, gate_up, down), T = 1 and 512, float32 and bfloat16, libraries E10 r4,
  E64 r8, E256 r4, E256 r16, through the public runner; PEFT's Arrow layer in float32 for E <= 64
  (``benchmarks/cpu_ops.py``);
- ``model``: a random Phi-3 (hidden 1024, 4 layers), 10 task + 3 general adapters r=8 with GenKnowSub, prefill 512 and
  decode 32 tokens, float32 and bfloat16, base / patched / PEFT (float32) (``benchmarks/cpu_model.py``);
- ``prototypes``: a whole Phi-3-mini library's exact prototypes: ours / PEFT's power loop / torch.linalg
  (``benchmarks/cpu_prototypes.py``);
- ``layer``: the demo's hidden-256 Phi-3, one patched layer against the unpatched one at T = 1 and 16
  (``benchmarks/layer_overhead.py``), and that whole model's prefill / decode (``small-model`` rows).

Each case records, per implementation, the seconds per call of every round; write_results.py takes the ratios per
round. Also recorded: the CPU as torch and the kernel see it, versions, threads, the load average before and after
(the machine may be shared: ratios hold up under load, absolute times do not) and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch

SECTIONS = ("op", "model", "prototypes", "layer")
# /proc/cpuinfo flags that decide which kernels can run (the guest may lack some of the host CPU's: this VM shows no
# AVX-512 although its host CPU has it).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16")


def machine() -> dict:
    """The CPU as the OS, torch and the compiled kernel see it."""
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
    from genknowsub_fast.backends import cpu_kernel

    try:
        isa = cpu_kernel.isa()
    except ValueError as exc:
        isa = f"unavailable ({exc})"
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_isa": isa,
    }


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    import transformers

    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "peft": peft_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def run(sections: list[str], repeats: int, quick: bool, progress, rows: list[dict]) -> None:
    """Append the rows of every case of ``sections`` to ``rows``; ``quick``: a small subset of each (a smoke run)."""
    from benchmarks import cpu_model, cpu_ops, cpu_prototypes, layer_overhead

    if "op" in sections:
        modules = ["qkv_proj"] if quick else list(cpu_ops.PHI3_MINI_SHAPES)
        libraries = ["E10_r4", "E256_r16"] if quick else list(cpu_ops.CPU_LIBRARIES)
        rows.extend(cpu_ops.run_cases(modules, libraries, list(cpu_ops.DTYPES), list(cpu_ops.TOKENS), repeats,
                                  block_s=0.05 if quick else 0.2, progress=progress))  # fmt: skip
    if "model" in sections:
        ms = cpu_model.build("bench", 10, 3, 8, 512, ["float32", "bfloat16"], peft=True)
        rows.extend(cpu_model.run_cases(ms, "model", 64 if quick else 512, 4 if quick else 32, repeats, 0.3, progress))
        del ms
    if "prototypes" in sections:
        rows.extend(cpu_prototypes.run_cases(["E10_r4"] if quick else ["E10_r4", "E64_r8"], repeats, 0.3, progress))
    if "layer" in sections:
        lo = layer_overhead
        ms = cpu_model.build(lo.SIZE, lo.TASKS, lo.GENERAL, lo.RANK, 128, ["float32", "bfloat16"], peft=True)
        rows.extend(lo.run_cases(ms, "qkv_proj", lo.TOKENS, max(repeats, 7), 0.05 if quick else 0.2, progress))
        rows.extend(cpu_model.run_cases(ms, "small-model", 128, 32, repeats, 0.2, progress))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per case (at least 3)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="a few cases of each section, short blocks (smoke run)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3: a median and a spread need rounds")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    torch.set_num_threads(int(os.environ.get("GKF_BENCH_THREADS", min(2, os.cpu_count() or 1))))
    torch.manual_seed(0)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s, load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    progress(f"sections {', '.join(args.sections)}; {args.repeats} rounds per case; {torch.get_num_threads()} threads")
    rows: list[dict] = []
    interrupted = False
    try:
        run(args.sections, args.repeats, args.quick, progress, rows)
    except KeyboardInterrupt:  # keep what was measured; write_results.py says the run was interrupted
        interrupted = True
        progress("interrupted: writing the cases measured so far")
    data = {
        "format": "interleaved",
        "datetime": started,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "command": shlex.join(["python", "-m", "benchmarks.bench_cpu", *(argv if argv is not None else sys.argv[1:])]),
        "repeats": args.repeats,
        "quick": args.quick,
        "interrupted": interrupted,
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "machine": machine(),
        "versions": versions(),
        "cases": rows,
    }
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    progress(f"wrote {args.json} ({len(rows)} cases{', interrupted' if interrupted else ''})")
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
