"""RESULTS.md and the README speed table from the interleaved CPU benchmark JSON (``benchmarks/bench_cpu.py``).

Every case holds, per implementation, the seconds per call of each round. A ratio is taken per round (the
implementations of a round ran back to back) and reported as the median over rounds with its spread (min–max); an
absolute time is the median over rounds. Targets are judged on the median ratio.
"""

from __future__ import annotations

import statistics

# (section, substring of the case name, (impl, reference impl, max ratio)): the speed targets of docs/design.md.
CPU_TARGETS = [
    ("op", "E10_", ("ours", "base", 1.05)),
    ("op", "E64_", ("ours", "base", 1.05)),
    ("op", "E256_", ("ours", "base", 1.10)),
    ("model", "", ("ours", "base", 1.10)),
    # Prototypes: >= 20x faster than PEFT's power-iteration loop, >= 3x faster than the torch.linalg composite.
    ("prototypes", "", ("ours", "peft", 0.05)),
    ("prototypes", "", ("ours", "torch", 1 / 3)),
]
# The ratio columns of each section's table, and its title.
SECTIONS = {
    "op": ("Op level: one Phi-3-mini linear layer, top-k 3 (x: 1 × T × d_in)", [("ours", "base"), ("ours", "peft")]),
    "model": ("Model level: prefill and decode (decode: per generated token)", [("ours", "base"), ("ours", "peft")]),
    "small-model": ("The demo's hidden-256 model: prefill and decode", [("ours", "base"), ("ours", "peft")]),
    "layer": (
        "One patched layer of the hidden-256 model against the unpatched layer (what a call adds)",
        [("ours", "base")],
    ),  # fmt: skip
    "prototypes": (
        "Exact prototypes of a whole Phi-3-mini library (32 layers × 4 modules)",
        [("ours", "peft"), ("ours", "torch")],
    ),  # fmt: skip
}
IMPL_ORDER = ("base", "ours", "peft", "torch")
NAMES = {"peft": "PEFT"}  # column headings
README_NOTE = "✗"  # marks a missed target in the README's compact tables


def ratio(case: dict, impl: str, ref: str) -> tuple[float, float, float] | None:
    """(median, min, max) over rounds of the per-round ratio impl / ref, or None when the case lacks one of them."""
    times = case["times"]
    if impl not in times or ref not in times:
        return None
    per_round = [a / b for a, b in zip(times[impl], times[ref], strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def added(case: dict, impl: str = "ours", ref: str = "base") -> tuple[float, float, float]:
    """(median, min, max) over rounds of the per-call time impl − ref, in seconds."""
    per_round = [a - b for a, b in zip(case["times"][impl], case["times"][ref], strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def median_time(case: dict, impl: str) -> float:
    return statistics.median(case["times"][impl])


def targets(case: dict) -> list[tuple[str, str, float]]:
    return [t for section, sub, t in CPU_TARGETS if case["section"] == section and sub in case["case"]]


def verdicts(case: dict) -> list[tuple[str, bool]]:
    """("≤ 1.05× base", met) for each target of the case whose implementations were measured."""
    out = []
    for impl, ref, limit in targets(case):
        r = ratio(case, impl, ref)
        if r is not None:
            out.append((f"≤ {limit:.2f}× {ref}", r[0] <= limit))
    return out


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_ratio(r: tuple[float, float, float] | None, digits: int = 3) -> str:
    if r is None:
        return ""
    med, lo, hi = r
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _verdict_text(case: dict) -> str:
    return "; ".join(f"{name}: {'met' if ok else 'missed'}" for name, ok in verdicts(case))


def _header(data: dict) -> list[str]:
    m, v = data["machine"], data["versions"]
    flags = " ".join(m["cpu_flags"]) or "none of the listed ones"
    avx512 = "" if any(f.startswith("avx512") for f in m["cpu_flags"]) else " (no AVX-512 visible to this OS)"
    return [
        f"- CPU: {m['cpu']} ({m['cores']} cores); vector flags the OS shows: {flags}{avx512}",
        f"- torch CPU capability: {m['torch_cpu_capability']}; routed kernel ISA: {m['kernel_isa']}",
        f"- torch {v['torch']}, triton {v['triton']}, peft {v['peft']}, transformers {v['transformers']}, "
        f"python {v['python']}; torch threads: {v['threads']}",
        f"- run started {data['datetime']}, took {data['elapsed_s']:.0f} s; load average (1, 5, 15 min) "
        f"{_load(data['loadavg_start'])} at the start, {_load(data['loadavg_end'])} at the end",
        f"- {data['repeats']} interleaved rounds per case (7 at least for the one-layer rows)"
        + ("; QUICK smoke run: a subset with short blocks, not the benchmark" if data.get("quick") else "")
        + ("; INTERRUPTED: only the cases measured before the interrupt" if data.get("interrupted") else ""),
        f"- command: `{data['command']}`",
    ]


def _load(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def _by_section(data: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for case in data["cases"]:
        out.setdefault(case["section"], []).append(case)
    return out


def render(data: dict) -> str:
    """RESULTS.md for one interleaved CPU run: every case with its absolute medians, ratios, spreads and targets."""
    lines = [
        "# Benchmark results (CPU)",
        "",
        "Written by `benchmarks/write_results.py` from `benchmarks/results/latest.json` (`make bench`). In every case",
        "the implementations run alternately inside one measurement, the order flipping every round; a ratio is taken",
        "per round, and is given as its median (min–max) over the rounds. Times are medians per call over the rounds.",
        "Do not edit by hand: rerun `make bench`.",
        "",
        *_header(data),
    ]
    for section, cases in _by_section(data).items():
        title, pairs = SECTIONS.get(section, (section, [("ours", "base")]))
        impls = [i for i in IMPL_ORDER if any(i in c["times"] for c in cases)]
        impls += sorted({i for c in cases for i in c["times"]} - set(impls))
        extra = ["added per call"] if section == "layer" else []
        cols = [*(NAMES.get(i, i) for i in impls), *extra, *(f"{a} × {NAMES.get(b, b)}" for a, b in pairs), "target"]
        lines += ["", f"## {title}", "", "| case | " + " | ".join(cols) + " |",
                  "|---|" + "---:|" * (len(cols) - 1) + "---|"]  # fmt: skip
        for case in cases:
            cells = [fmt_time(median_time(case, i)) if i in case["times"] else "" for i in impls]
            if extra:
                med, lo, hi = added(case)
                cells.append(f"{med * 1e6:.1f} µs ({lo * 1e6:.1f}–{hi * 1e6:.1f})")
            cells += [fmt_ratio(ratio(case, a, b)) for a, b in pairs]
            cells.append(_verdict_text(case))
            lines.append(f"| {case['case']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _cell(case: dict | None) -> str:
    """A README op cell: ours × base, median (min–max), with ✗ when its target is missed."""
    if case is None:
        return ""
    missed = any(not ok for _, ok in verdicts(case))
    return fmt_ratio(ratio(case, "ours", "base"), 2) + (f" {README_NOTE}" if missed else "")


def summary(data: dict) -> str:
    """The README's speed table: op level as a matrix of ours × base, then the other sections' ratios."""
    m, v = data["machine"], data["versions"]
    cases = _by_section(data)
    lines = [
        f"Measured by `make bench` on {m['cpu']} ({m['cores']} cores; torch sees {m['torch_cpu_capability']}, the "
        f"kernel runs {m['kernel_isa']}), torch {v['torch']}, {v['threads']} threads, started {data['datetime']}, "
        f"load average {data['loadavg_start'][0]:.1f} at the start. Ratios: median (min–max) over {data['repeats']} "
        f"interleaved rounds; {README_NOTE} = target missed. Absolute times and every case: `benchmarks/RESULTS.md`."
        + (" QUICK smoke run: a subset with short blocks, not the benchmark." if data.get("quick") else "")
        + (" INTERRUPTED: only the cases measured before the interrupt." if data.get("interrupted") else ""),
    ]
    ops = cases.get("op", [])
    if ops:
        index = {(c["info"]["module"], c["info"]["library"], c["info"]["dtype"], c["info"]["tokens"]): c for c in ops}
        dtypes = list(dict.fromkeys(k[2] for k in index))
        tokens = sorted({k[3] for k in index})
        cols = [(d, t) for d in dtypes for t in tokens]
        lines += ["", "| op: ours × base | " + " | ".join(f"{_short(d)} T={t}" for d, t in cols) + " | target |",
                  "|---|" + "---:|" * len(cols) + "---|"]  # fmt: skip
        for module, library in dict.fromkeys((k[0], k[1]) for k in index):
            row = [_cell(index.get((module, library, d, t))) for d, t in cols]
            first = next(c for k, c in index.items() if k[:2] == (module, library))
            limit = " ".join(name for name, _ in verdicts(first)) or ""
            lines.append(f"| {module} {library} | " + " | ".join(row) + f" | {limit} |")
    rest = [c for s in ("model", "small-model", "layer", "prototypes") for c in cases.get(s, [])]
    if rest:
        lines += ["", "| case | ours × base | ours × PEFT | ours × torch | target |", "|---|---:|---:|---:|---|"]
        for case in rest:
            refs = (("base", 2), ("peft", 3), ("torch", 3))
            cells = [fmt_ratio(ratio(case, "ours", ref), digits) for ref, digits in refs]
            lines.append(f"| {case['case']} | " + " | ".join(cells) + f" | {_verdict_text(case)} |")
    return "\n".join(lines)


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


__all__ = ["CPU_TARGETS", "ratio", "added", "verdicts", "render", "summary"]
