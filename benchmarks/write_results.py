"""Write a benchmark report (RESULTS.md) from the JSON of a benchmark run, and the README's speed table.

    python benchmarks/write_results.py benchmarks/results/latest.json [-o benchmarks/RESULTS.md] [--readme README.md]

Two layouts are read:
- the pytest-benchmark JSON of ``pytest benchmarks/ --benchmark-only --benchmark-json ...`` (what ``make bench``
  writes): per case, every implementation's seconds per call in each interleaved round, the machine and the run; the
  tables and the README block come from ``benchmarks/report.py`` (ratios per round, their median and spread, the ISA
  of every number, targets, the scale case's memory);
- the rows of ``python -m benchmarks.bench_gpu`` (one median per group and implementation), for ``RESULTS_gpu.md``:
  each implementation's median with its ratio to the group's "base" and "peft" rows, next to the device and versions
  the run recorded.

The ``<!-- eval-compare -->`` and ``<!-- vllm-throughput -->`` blocks of the output (written by
``benchmarks/eval_compare.py`` and ``benchmarks/vllm_throughput.py``) survive a rewrite; one that does not name the ISA
it was measured on is marked as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402


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
    """The GPU targets of a rows-layout group (``report.TARGETS`` of its section)."""
    section = "gpu model" if group.startswith("gpu model") else "gpu op" if group.startswith("gpu op ") else None
    return [target for sec, sub, target in report.TARGETS if sec == section and sub in group]


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


UNNAMED_ISA_NOTE = (
    "> Kept from an earlier run that did not record the CPU's instruction set (ISA): it may come from another "
    "machine than the numbers above. Rerun the command it names to measure it here."
)


def flag_unnamed_isa(block: str) -> str:
    """A kept block (markers included) as it is when it names the ISA it was measured on, else with
    :data:`UNNAMED_ISA_NOTE` under its begin marker (the script that writes the block replaces the note with it)."""
    if "ISA" in block:
        return block
    begin, rest = block.split("\n", 1)
    return f"{begin}\n{UNNAMED_ISA_NOTE}\n\n{rest}"


def update_readme(path: str, table: str) -> None:
    """Replace the text between the README's speed-table markers with ``table``."""
    replace_block(path, README_BEGIN, README_END, table)


def render(data: dict, command: str | None = None) -> str:
    """The markdown report of one benchmark JSON document (``command``: the one to show for the rows layout; the
    pytest-benchmark JSON records its own)."""
    if report.is_pytest_run(data):
        return report.render(report.from_pytest_json(data))
    return render_rows(data, command or "n/a")


def render_rows(data: dict, command: str) -> str:
    """The markdown report of a JSON in the rows layout (bench_gpu.py)."""
    groups, devices = _groups(data)
    extras = _extras(data)
    gpu_cols = any("predicted_ratio" in i or "output_check" in i for i in extras.values())
    # Versions of the machine that ran the benchmarks when the JSON records them (bench_gpu.py), else of this one.
    v = {**_versions(), **data.get("versions", {})}
    machine = data.get("machine_info", {})
    lines = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/write_results.py` from one benchmark run; every ratio compares medians measured in",
        "that same run. Do not edit by hand: rerun the benchmark.",
        "",
        f"- device: {v['device']}",
        *([f"- device recorded by the benchmarks: {', '.join(sorted(devices))}"] if devices else []),
        f"- host CPU: {machine.get('cpu', {}).get('brand_raw', 'n/a')}",
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
            line = f"| {group} | {impl} | {report.fmt_time(med)} | {vs_base} | {vs_peft} | {verdict} |"
            if gpu_cols:
                info = extras.get((group, impl), {})
                line += f" {info.get('predicted_ratio', '')} | {info.get('output_check', '')} |"
            lines.append(line)
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the JSON of pytest benchmarks/ --benchmark-json, or bench_gpu.py's rows")
    parser.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--command", help="the command to show for a rows JSON (the pytest JSON records its own)")
    parser.add_argument("--readme", help="also fill this README's speed-table block (pytest JSON only)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    pytest_run = report.is_pytest_run(data)
    if args.readme and not pytest_run:
        raise ValueError(f"{args.json}: the README speed table comes from the JSON of pytest benchmarks/ only")
    if pytest_run and not report.from_pytest_json(data)["cases"]:
        raise ValueError(f"{args.json}: no benchmark case recorded (were they all skipped or deselected?)")
    text = render(data, args.command)
    # The other scripts' sections survive a rerun of the benchmarks.
    kept = [flag_unnamed_isa(b) for b in (kept_block(args.output, begin, end) for begin, end in KEPT_BLOCKS) if b]
    with open(args.output, "w") as f:
        f.write(text + "".join(f"\n{b}\n" for b in kept))
    print(f"wrote {args.output} ({len(data['benchmarks'])} cases)")
    if args.readme:
        update_readme(args.readme, report.summary(report.from_pytest_json(data)))
        print(f"updated the speed table of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
