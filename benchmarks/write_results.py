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
    # GPU (benchmarks/test_bench_triton.py, bf16): "≥ 20× faster than PEFT" is ≤ 0.05× its time; "decode ≥ 0.90× base
    # tokens/s" is ≤ 1/0.90 of its time.
    ("gpu op ", " T=256 ", ("ours", "base", 1.05)),
    ("gpu op ", " T=4096 ", ("ours", "base", 1.05)),
    ("gpu op ", " T=4096 ", ("ours", "peft", 0.05)),
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
        # GPU benchmarks time `calls` back-to-back calls per round (one device sync each): report per call.
        groups[bench.get("group") or bench["name"]][impl] = bench["stats"]["median"] / info.get("calls", 1)
        if info.get("device"):
            devices.add(info["device"])
    return groups, devices


def _verdicts(group: str, impl: str, impls: dict[str, float]) -> str:
    out = []
    for t_impl, ref, limit in _targets(group):
        if impl == t_impl and ref in impls:
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
        base = "base_graph" if ours == "ours_graph" and "base_graph" in impls else "base"
        vs_base = f"{impls[ours] / impls[base]:.2f}" if base in impls else ""
        vs_peft = f"{impls[ours] / impls['peft']:.3f}" if "peft" in impls else ""
        lines.append(f"| {group} | {vs_base} | {vs_peft} | {_verdicts(group, ours, impls)} |")
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- speed-table -->", "<!-- /speed-table -->"
# Blocks of RESULTS.md written by other scripts from their own runs (not from this JSON), kept when RESULTS.md is
# rewritten: "vllm-throughput" by benchmarks/vllm_throughput.py (make bench-vllm).
KEPT_BLOCKS = ("vllm-throughput",)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def get_block(text: str, name: str) -> str | None:
    """The block ``<!-- name --> ... <!-- /name -->`` of ``text``, markers included, or None."""
    begin, end = _markers(name)
    if begin not in text or end not in text.split(begin, 1)[1]:
        return None
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end


def set_block(text: str, name: str, content: str) -> str:
    """``text`` with the block ``name`` holding ``content``: replaced where it is, else appended at the end."""
    begin, end = _markers(name)
    block = f"{begin}\n{content.strip()}\n{end}"
    old = get_block(text, name)
    if old is not None:
        return text.replace(old, block, 1)
    return f"{text.rstrip()}\n\n{block}\n"


def update_readme(path: str, table: str) -> None:
    """Replace the text between the README's speed-table markers with ``table``."""
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to fill")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


def render(data: dict, command: str) -> str:
    """The markdown report for one pytest-benchmark JSON document."""
    groups, devices = _groups(data)
    v = _versions()
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
        "| case | impl | median | × base | × PEFT | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for group in sorted(groups):
        impls = groups[group]
        for impl, med in impls.items():
            vs_base = f"{med / impls['base']:.3f}" if "base" in impls else ""
            vs_peft = f"{med / impls['peft']:.3f}" if "peft" in impls else ""
            verdict = _verdicts(group, impl, impls)
            lines.append(f"| {group} | {impl} | {_fmt(med)} | {vs_base} | {vs_peft} | {verdict} |")
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
    if os.path.exists(args.output):
        with open(args.output) as f:
            previous = f.read()
        for name in KEPT_BLOCKS:
            block = get_block(previous, name)
            if block is not None:
                text = set_block(text, name, block.split("\n", 1)[1].rsplit("\n", 1)[0])
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output} ({len(data['benchmarks'])} benchmarks)")
    if args.readme:
        update_readme(args.readme, summary(data))
        print(f"updated the speed table of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
