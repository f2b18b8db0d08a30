"""Write benchmarks/RESULTS.md from a pytest-benchmark JSON file.

Usage: python benchmarks/write_results.py benchmarks/results/latest.json [-o benchmarks/RESULTS.md]

Every benchmark group is one case measured in one run; each implementation's median is reported with its ratio to the
group's "base" and "peft" implementations (the ``impl`` extra_info of each benchmark), next to the device, CPU
threads, torch and triton versions recorded at write time and the command that produced the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections import defaultdict

# Targets of DESIGN.md / the issues, keyed by a substring of the group name: (impl, reference impl, max ratio).
TARGETS = [
    ("op ", "E10_r4", ("ours", "base", 1.05)),
    ("op ", "E64_r8", ("ours", "base", 1.10)),
    ("model prefill", "", ("ours", "base", 1.10)),
    ("model decode", "", ("ours", "base", 1.10)),
    # Prototypes (issue 4): ≥ 20× faster than PEFT's power-iteration loop, ≥ 3× faster than the torch.linalg composite.
    ("prototypes ", "", ("ours", "peft", 0.05)),
    ("prototypes ", "", ("ours", "torch", 1 / 3)),
    # GPU (benchmarks/bench_gpu.py, bf16): "≥ 20× faster than PEFT" is ≤ 0.05× its time; "decode ≥ 0.90× base
    # tokens/s" is ≤ 1/0.90 of its time.
    ("gpu op ", " T=256 ", ("ours", "base", 1.05)),
    ("gpu op ", " T=4096 ", ("ours", "base", 1.05)),
    ("gpu op ", " T=4096 ", ("ours", "peft", 0.05)),
    ("gpu op ", " T=256 ", ("ours_fused", "base", 1.05)),
    ("gpu op ", " T=4096 ", ("ours_fused", "base", 1.05)),
    ("gpu op ", " T=1 ", ("ours_graph", "base_graph", 1.15)),
    ("gpu model decode", "", ("ours", "base", 1 / 0.90)),
]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["threads"] = str(torch.get_num_threads())
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    except ImportError:
        out["device"] = _cpu_name()
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def _targets(group: str) -> list[tuple[str, str, float]]:
    return [target for prefix, sub, target in TARGETS if group.startswith(prefix) and sub in group]


def _groups(data: dict) -> tuple[dict[str, dict[str, float]], set[str]]:
    """Per-call medians by group and impl, and the devices the benchmarks recorded."""
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    devices: set[str] = set()
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        impl = info.get("impl") or bench["name"]
        # Benchmarks that time `calls` back-to-back calls per round report per call.
        groups[bench.get("group") or bench["name"]][impl] = bench["stats"]["median"] / info.get("calls", 1)
        if info.get("device"):
            devices.add(info["device"])
    return groups, devices


def _extras(data: dict) -> dict[tuple[str, str], dict]:
    """extra_info by (group, impl), for the GPU columns (output check, predicted ratio)."""
    out = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        out[(bench.get("group") or bench["name"], info.get("impl") or bench["name"])] = info
    return out


def base_of(impl: str, impls: dict[str, float]) -> str:
    """The row a ratio is taken against: a CUDA-graph row against the graphed base, any other against "base"."""
    return "base_graph" if impl.endswith("_graph") and "base_graph" in impls else "base"


def _verdicts(group: str, impl: str, impls: dict[str, float]) -> str:
    out = []
    for t_impl, ref, limit in _targets(group):
        if impl == t_impl and ref in impls and impl in impls:
            ratio = impls[impl] / impls[ref]
            out.append(f"≤ {limit:.2f}× {ref}: {'met' if ratio <= limit else 'missed'}")
    return "; ".join(out)


def summary(data: dict) -> str:
    """A short markdown table for the README: per case, ours against base and PEFT, and the target verdicts."""
    groups, _ = _groups(data)
    v = _versions()
    lines = [
        f"Measured by `make bench` on {v['device']}, torch {v.get('torch', 'n/a')}, {v.get('threads')} threads "
        f"(run started {data.get('datetime', 'n/a')}); medians of one run, full table in `benchmarks/RESULTS.md`.",
        "",
        "| case | ours × base | ours × PEFT | target |",
        "|---|---:|---:|---|",
    ]
    for group in sorted(groups):
        impls = groups[group]
        ours = next((i for i in ("ours", "ours_graph") if i in impls), None)
        if ours is None:
            continue
        base = base_of(ours, impls)
        vs_base = f"{impls[ours] / impls[base]:.2f}" if base in impls else ""
        vs_peft = f"{impls[ours] / impls['peft']:.3f}" if "peft" in impls else ""
        lines.append(f"| {group} | {vs_base} | {vs_peft} | {_verdicts(group, ours, impls)} |")
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- speed-table -->", "<!-- /speed-table -->"
# RESULTS.md blocks written by other scripts from their own runs; main() keeps them when it rewrites the file:
# benchmarks/eval_compare.py's and benchmarks/vllm_throughput.py's (make bench-vllm).
EVAL_BEGIN, EVAL_END = "<!-- eval-compare -->", "<!-- /eval-compare -->"
VLLM_BEGIN, VLLM_END = "<!-- vllm-throughput -->", "<!-- /vllm-throughput -->"
KEPT_BLOCKS = ((EVAL_BEGIN, EVAL_END), (VLLM_BEGIN, VLLM_END))


def replace_block(path: str, begin: str, end: str, content: str, append: bool = False) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of file ``path`` with ``content``.

    Without the markers: ValueError, or with ``append`` the marked block is added at the end (the file is created).
    """
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
    elif append:
        head, tail = (text.rstrip("\n") + "\n\n" if text else ""), "\n"
    else:
        raise ValueError(f"{path} has no {begin} ... {end} block to fill")
    body = content.strip("\n")
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{body}\n{end}{tail}")


def kept_block(path: str, begin: str = EVAL_BEGIN, end: str = EVAL_END) -> str:
    """The marked block of ``path`` (markers included), or "" when there is none."""
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        return ""
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end


def update_readme(path: str, table: str) -> None:
    """Replace the text between the README's speed-table markers with ``table``."""
    replace_block(path, README_BEGIN, README_END, table)


def render(data: dict, command: str) -> str:
    """The markdown report for one pytest-benchmark JSON document."""
    groups, devices = _groups(data)
    extras = _extras(data)
    gpu_cols = any("predicted_ratio" in i or "output_check" in i for i in extras.values())
    # Versions of the machine that ran the benchmarks when the JSON records them (bench_gpu.py), else of this one.
    v = {**_versions(), **data.get("versions", {})}
    machine = data.get("machine_info", {})
    lines = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/write_results.py` from one pytest-benchmark run; every ratio compares medians measured",
        "in that same run. Do not edit by hand: rerun `make bench`.",
        "",
        f"- device: {v['device']}",
        *([f"- device recorded by the benchmarks: {', '.join(sorted(devices))}"] if devices else []),
        f"- host CPU (pytest-benchmark): {machine.get('cpu', {}).get('brand_raw', 'n/a')}",
        f"- torch {v.get('torch', 'n/a')}, triton {v['triton']}, python {v['python']}",
        f"- torch threads: {v.get('threads')}",
        f"- run started: {data.get('datetime', 'n/a')}",
        f"- command: `{command}`",
        "",
        "| case | impl | median | × base | × PEFT | target |" + (" predicted × base | output check |" * gpu_cols),
        "|---|---|---:|---:|---:|---|" + ("---:|---|" * gpu_cols),
    ]
    for group in sorted(groups):
        impls = groups[group]
        for impl, med in impls.items():
            base = base_of(impl, impls)
            vs_base = f"{med / impls[base]:.3f}" if base in impls else ""
            vs_peft = f"{med / impls['peft']:.3f}" if "peft" in impls else ""
            verdict = _verdicts(group, impl, impls)
            line = f"| {group} | {impl} | {_fmt(med)} | {vs_base} | {vs_peft} | {verdict} |"
            if gpu_cols:
                info = extras.get((group, impl), {})
                line += f" {info.get('predicted_ratio', '')} | {info.get('output_check', '')} |"
            lines.append(line)
    lines.append("")
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument(
        "--command", default="pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/latest.json"
    )
    parser.add_argument("--readme", help="also fill this README's speed-table block with a summary")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    text = render(data, args.command)
    # The other scripts' sections survive a rerun of the benchmarks.
    kept = [b for b in (kept_block(args.output, begin, end) for begin, end in KEPT_BLOCKS) if b]
    with open(args.output, "w") as f:
        f.write(text + "".join(f"\n{b}\n" for b in kept))
    print(f"wrote {args.output} ({len(data['benchmarks'])} benchmarks)")
    if args.readme:
        update_readme(args.readme, summary(data))
        print(f"updated the speed table of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
