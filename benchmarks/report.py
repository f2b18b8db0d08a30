"""RESULTS.md and the README speed table from the JSON of ``pytest benchmarks/ --benchmark-json`` (pytest-benchmark).

Every interleaved case (``benchmarks/conftest.py``) keeps in its ``extra_info`` the seconds per call of each
implementation in every round. A ratio is taken per round (the implementations of a round ran back to back) and
reported as the median over rounds with its spread (min–max); an absolute time is the median over rounds. Targets are
judged on the median ratio. The scale case (``benchmarks/scale.py``) keeps its measurements per round instead: times,
and resident memory as multiples of the library's bytes.
"""

from __future__ import annotations

import statistics

# (section, substring of the case name, (impl, reference impl, max ratio)): the speed targets of docs/design.md.
# "≥ 20× faster than PEFT" is ≤ 0.05× its time; "decode ≥ 0.90× base tokens/s" is ≤ 1/0.90 of its time.
TARGETS = [
    ("op", "E10_", ("ours", "base", 1.05)),
    ("op", "E64_", ("ours", "base", 1.05)),
    ("op", "E256_", ("ours", "base", 1.10)),
    ("model", "", ("ours", "base", 1.10)),
    # Prototypes: >= 20x faster than PEFT's power-iteration loop, >= 3x faster than the torch.linalg composite.
    ("prototypes", "", ("ours", "peft", 0.05)),
    ("prototypes", "", ("ours", "torch", 1 / 3)),
    ("gpu op", " T=256 ", ("ours", "base", 1.05)),
    ("gpu op", " T=4096 ", ("ours", "base", 1.05)),
    ("gpu op", " T=4096 ", ("ours", "peft", 0.05)),
    ("gpu op", " T=256 ", ("ours_fused", "base", 1.05)),
    ("gpu op", " T=4096 ", ("ours_fused", "base", 1.05)),
    ("gpu op", " T=1 ", ("ours_graph", "base_graph", 1.15)),
    ("gpu model", "decode", ("ours", "base", 1 / 0.90)),
]
# The scale case's targets: extra resident memory after load + patch + forward and its peak, as multiples of the
# library's bytes; load + patch seconds per GB of library; the build's seconds per GiB of input adapters and its peak
# against 1.25× its output plus one adapter.
SCALE_TARGETS = {
    "extra_rss_x": 1.10,
    "peak_x": 1.25,
    "load_patch_s_per_gb": 1.0,
    "build_s_per_gib": 2.0,
    "build_peak_output_x": 1.25,
}
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
    "gpu op": (
        "GPU op level: one Phi-3-mini linear layer, bf16, top-k 3 (*_graph: replayed from CUDA graphs)",
        [("ours", "base"), ("ours_fused", "base"), ("ours_graph", "base_graph"), ("ours_fused_graph", "base_graph"),
         ("ours", "peft")],
    ),  # fmt: skip
    "gpu model": ("GPU model level: prefill and decode (decode: per generated token)", [("ours", "base")]),
    "scale": ("Scale: a 256-expert library, held once in memory (each step in a fresh process)", []),
}
IMPL_ORDER = ("base", "ours", "peft", "torch", "base_graph", "ours_graph", "ours_fused", "ours_fused_graph")
NAMES = {"peft": "PEFT"}  # column headings
README_NOTE = "✗"  # marks a missed target in the README's compact tables
GB, GIB = 1e9, 2**30


# ---------------------------------------------------------------------------------------------------- ratios, targets
def ratio(case: dict, impl: str, ref: str) -> tuple[float, float, float] | None:
    """(median, min, max) over rounds of the per-round ratio impl / ref, or None when the case lacks one of them."""
    times = case.get("times", {})
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
    return [t for section, sub, t in TARGETS if case["section"] == section and sub in case["case"]]


def verdicts(case: dict) -> list[tuple[str, bool]]:
    """("≤ 1.05× base", met) for each target of the case whose implementations were measured."""
    out = []
    for impl, ref, limit in targets(case):
        r = ratio(case, impl, ref)
        if r is not None:
            who = "" if impl == "ours" else f"{impl} "
            out.append((f"{who}≤ {limit:.2f}× {ref}", r[0] <= limit))
    return out


def ratios(case: dict) -> dict[str, dict[str, float]]:
    """The case's ratios as ``extra_info`` records them: ``{"ours/base": {"median", "min", "max"}, ...}`` for every
    ratio column of its section (and ``"peft/ours"``, the speed-up over PEFT) whose implementations were measured."""
    out = {}
    for impl, ref in SECTIONS.get(case["section"], ("", [("ours", "base")]))[1]:
        r = ratio(case, impl, ref)
        if r is not None:
            out[f"{impl}/{ref}"] = dict(zip(("median", "min", "max"), r))
        if ref == "peft" and r is not None:
            s = ratio(case, ref, impl)
            out[f"{ref}/{impl}"] = dict(zip(("median", "min", "max"), s))
    return out


def scale_summary(case: dict) -> dict[str, tuple[float, float, float]]:
    """The scale case's derived quantities, each (median, min, max) over its rounds: multiples of the library's bytes
    (load) or of the output (build) and seconds per GB / GiB."""
    rounds, info = case["rounds"], case["info"]

    def stat(values: list[float]) -> tuple[float, float, float]:
        return statistics.median(values), min(values), max(values)

    if case["kind"] == "load":
        lib = info["library_bytes"]
        return {
            "load_s": stat([r["load_s"] for r in rounds]),
            "patch_s": stat([r["patch_s"] for r in rounds]),
            "load_patch_s_per_gb": stat([(r["load_s"] + r["patch_s"]) / (lib / GB) for r in rounds]),
            "extra_rss_x": stat([r["extra_rss"] / lib for r in rounds]),
            "extra_rss_after_del_x": stat([r["extra_rss_after_del"] / lib for r in rounds]),
            "peak_x": stat([r["peak_extra"] / lib for r in rounds]),
        }
    bound = [SCALE_TARGETS["build_peak_output_x"] * r["output_bytes"] + r["one_adapter_bytes"] for r in rounds]
    return {
        "build_s": stat([r["build_s"] for r in rounds]),
        "build_s_per_gib": stat([r["build_s"] / (r["input_bytes"] / GIB) for r in rounds]),
        "peak_output_x": stat([r["peak_extra"] / r["output_bytes"] for r in rounds]),
        "peak_over_bound": stat([r["peak_extra"] / b for r, b in zip(rounds, bound)]),
    }


def scale_verdicts(case: dict) -> list[tuple[str, bool]]:
    """("extra RSS ≤ 1.10× library", met), ... for the scale case (judged on the medians)."""
    s, t = scale_summary(case), SCALE_TARGETS
    if case["kind"] == "load":
        return [
            (f"extra RSS ≤ {t['extra_rss_x']:.2f}× library", s["extra_rss_x"][0] <= t["extra_rss_x"]),
            (f"peak ≤ {t['peak_x']:.2f}× library", s["peak_x"][0] <= t["peak_x"]),
            (
                f"load + patch ≤ {t['load_patch_s_per_gb']:.0f} s/GB",
                s["load_patch_s_per_gb"][0] <= t["load_patch_s_per_gb"],
            ),
        ]
    return [
        (f"≤ {t['build_s_per_gib']:.0f} s/GiB input", s["build_s_per_gib"][0] <= t["build_s_per_gib"]),
        (f"peak ≤ {t['build_peak_output_x']:.2f}× output + one adapter", s["peak_over_bound"][0] <= 1.0),
    ]


def all_verdicts(case: dict) -> list[tuple[str, bool]]:
    return scale_verdicts(case) if case["section"] == "scale" else verdicts(case)


# --------------------------------------------------------------------------------------------------------- the JSON
def from_pytest_json(data: dict) -> dict:
    """The run as the renderers read it, from a pytest-benchmark JSON written with this directory's conftest: its
    record (``data["genknowsub_fast"]``), the machine and versions (``machine_info["genknowsub_fast"]``) and every
    case (the ``extra_info`` of each benchmark that has a ``section``), in the order they ran."""
    run = dict(data["genknowsub_fast"])
    run.update(data["machine_info"]["genknowsub_fast"])
    # When the run started (pytest-benchmark's "datetime" is when it wrote the JSON, at the end).
    run["started"] = run.get("started") or f"before {data.get('datetime', 'n/a')}"
    run["cases"] = [b["extra_info"] for b in data["benchmarks"] if "section" in b.get("extra_info", {})]
    return run


def is_pytest_run(data: dict) -> bool:
    """Whether ``data`` is the JSON of ``pytest benchmarks/`` (else bench_gpu.py's rows)."""
    return "genknowsub_fast" in data and "benchmarks" in data


# ------------------------------------------------------------------------------------------------------- formatting
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


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _verdict_text(verdicts_: list[tuple[str, bool]]) -> str:
    return "; ".join(f"{name}: {'met' if ok else 'missed'}" for name, ok in verdicts_)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def isa_of(run: dict) -> str:
    """The ISA(s) the CPU cases ran on, as one phrase."""
    isas = list(dict.fromkeys(c.get("isa", "n/a") for c in run["cases"] if not c["section"].startswith("gpu")))
    return ", ".join(isas) if isas else run["machine"]["kernel_isa"]


def _header(run: dict) -> list[str]:
    m, v = run["machine"], run["versions"]
    flags = " ".join(m["cpu_flags"]) or "none of the listed ones"
    forced = f" (forced by GENKNOWSUB_FAST_CPU_ISA={m['kernel_isa_forced']})" if m.get("kernel_isa_forced") else ""
    lines = [
        f"- CPU: {m['cpu']} ({m['cores']} cores); vector flags the OS shows: {flags}",
        f"- AVX-512 visible: {_yes(m['avx512'])}; AVX-512-BF16 visible: {_yes(m['avx512_bf16'])}; torch CPU "
        f"capability: {m['torch_cpu_capability']}; routed kernel ISA: {m['kernel_isa']}{forced}",
        f"- GPU: {m['gpu'] or 'none (the GPU cases were skipped)'}",
        f"- torch {v['torch']}, triton {v['triton']}, peft {v['peft']}, transformers {v['transformers']}, "
        f"python {v['python']}; torch threads: {v['threads']}",
        f"- run started {run['started']}, took {run['elapsed_s']:.0f} s; load average (1, 5, 15 min) "
        f"{_load(run['loadavg_start'])} at the start, {_load(run['loadavg_end'])} at the end",
        f"- {run['rounds']} interleaved rounds per case"
        + (" (7 at least for the one-layer rows)" if any(c["section"] == "layer" for c in run["cases"]) else "")
        + (f"; SUBSET run ({run['selection']}), not the whole benchmark" if run.get("selection") else "")
        + (f"; INTERRUPTED or FAILED (pytest exit status {run['exitstatus']}): only the cases measured before"
           if run.get("exitstatus") not in (0, None) else ""),  # fmt: skip
        f"- command: `{run['command']}`",
    ]
    return lines


def _load(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def _by_section(run: dict) -> dict[str, list[dict]]:
    """The cases by section, the sections in the order of :data:`SECTIONS` (then any other), cases as they ran."""
    out: dict[str, list[dict]] = {}
    for case in run["cases"]:
        out.setdefault(case["section"], []).append(case)
    order = list(SECTIONS)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _scale_tables(cases: list[dict]) -> list[str]:
    """The scale section's two tables (load + patch, build): medians (min–max) over rounds, beside the targets."""
    lines = []
    loads = [c for c in cases if c["kind"] == "load"]
    builds = [c for c in cases if c["kind"] == "build"]
    if loads:
        lines += [
            "| case | ISA | library | rounds | load | patch | load + patch per GB | extra RSS after patch + forward "
            "(× library) | after `del library` | peak (× library) | target |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in loads:
            s = scale_summary(c)
            lines.append(
                f"| {c['case']} | {c['isa']} | {fmt_bytes(c['info']['library_bytes'])} | {len(c['rounds'])} | "
                f"{fmt_time(s['load_s'][0])} | {fmt_time(s['patch_s'][0])} | "
                f"{fmt_ratio(s['load_patch_s_per_gb'], 2)} s | {fmt_ratio(s['extra_rss_x'], 2)} | "
                f"{fmt_ratio(s['extra_rss_after_del_x'], 2)} | {fmt_ratio(s['peak_x'], 2)} | "
                f"{_verdict_text(scale_verdicts(c))} |"
            )
    if builds:
        lines += [
            "" if loads else None,
            "| case | ISA | input adapters | output library | build | per GiB of input | peak (× output) | "
            "peak ÷ (1.25× output + one adapter) | target |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in builds:
            s, r0 = scale_summary(c), c["rounds"][0]
            lines.append(
                f"| {c['case']} | {c['isa']} | {fmt_bytes(r0['input_bytes'])} ({c['info']['adapters']} files) | "
                f"{fmt_bytes(r0['output_bytes'])} | {fmt_time(s['build_s'][0])} | "
                f"{fmt_ratio(s['build_s_per_gib'], 2)} s | {fmt_ratio(s['peak_output_x'], 2)} | "
                f"{fmt_ratio(s['peak_over_bound'], 2)} | {_verdict_text(scale_verdicts(c))} |"
            )
    return [line for line in lines if line is not None]


def render(run: dict) -> str:
    """RESULTS.md for one run: every case with its ISA, absolute medians, ratios, spreads and targets."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/write_results.py` from `benchmarks/results/latest.json`, the JSON of",
        "`pytest benchmarks/ --benchmark-only` (`make bench`). In every case the implementations run alternately",
        "inside one pytest-benchmark measurement, the order flipping every round; a ratio is taken per round, and is",
        "given as its median (min–max) over the rounds. Times are medians per call over the rounds. The ISA column",
        "says which path of the routed CPU kernel (or which GPU) each number was measured on. Do not edit by hand:",
        "rerun `make bench`.",
        "",
        *_header(run),
    ]
    for section, cases in _by_section(run).items():
        title, pairs = SECTIONS.get(section, (section, [("ours", "base")]))
        lines += ["", f"## {title}", ""]
        if section == "scale":
            lines += _scale_tables(cases)
            continue
        impls = [i for i in IMPL_ORDER if any(i in c["times"] for c in cases)]
        impls += sorted({i for c in cases for i in c["times"]} - set(impls))
        pairs = [(a, b) for a, b in pairs if any(ratio(c, a, b) is not None for c in cases)]
        extra = ["added per call"] if section == "layer" else []
        gpu = ["predicted × base (cost model)", "output check"] if section == "gpu op" else []
        cols = ["ISA", *(NAMES.get(i, i) for i in impls), *extra, *(f"{a} × {NAMES.get(b, b)}" for a, b in pairs),
                *gpu]  # fmt: skip
        lines += ["| case | " + " | ".join(cols) + " | target |", "|---|---|" + "---:|" * (len(cols) - 1) + "---|"]
        for case in cases:
            cells = [case.get("isa", "n/a")]
            cells += [fmt_time(median_time(case, i)) if i in case["times"] else "" for i in impls]
            if extra:
                med, lo, hi = added(case)
                cells.append(f"{med * 1e6:.1f} µs ({lo * 1e6:.1f}–{hi * 1e6:.1f})")
            cells += [fmt_ratio(ratio(case, a, b)) for a, b in pairs]
            if gpu:
                info = case["info"]
                cells.append(", ".join(f"{k} {v}" for k, v in info.get("predicted_ratio", {}).items()))
                cells.append("; ".join(f"{k}: {v}" for k, v in info.get("output_check", {}).items()))
            cells.append(_verdict_text(verdicts(case)))
            lines.append(f"| {case['case']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _cell(case: dict | None) -> str:
    """A README op cell: ours × base, median (min–max), with ✗ when its target is missed."""
    if case is None:
        return ""
    missed = any(not ok for _, ok in verdicts(case))
    return fmt_ratio(ratio(case, "ours", "base"), 2) + (f" {README_NOTE}" if missed else "")


def summary(run: dict) -> str:
    """The README's speed table: op level as a matrix of ours × base, then the other sections' ratios, then scale."""
    m, v = run["machine"], run["versions"]
    cases = _by_section(run)
    avx = f"AVX-512 visible: {_yes(m['avx512'])}, AVX-512-BF16 visible: {_yes(m['avx512_bf16'])}"
    lines = [
        f"Measured by `make bench` on {m['cpu']} ({m['cores']} cores; {avx}; torch sees {m['torch_cpu_capability']}), "
        f"routed kernel ISA of every CPU number: {isa_of(run)}; torch {v['torch']}, {v['threads']} threads, started "
        f"{run['started']}, load average {run['loadavg_start'][0]:.1f} at the start. Ratios: median (min–max) over "
        f"{run['rounds']} interleaved rounds; {README_NOTE} = target missed. Absolute times and every case: "
        "`benchmarks/RESULTS.md`."
        + (f" SUBSET run ({run['selection']}), not the whole benchmark." if run.get("selection") else "")
        + (f" INTERRUPTED or FAILED (pytest exit status {run['exitstatus']})." if run.get("exitstatus") else ""),
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
    rest = [c for s in ("model", "small-model", "layer", "prototypes", "gpu op", "gpu model") for c in cases.get(s, [])]
    if rest:
        lines += ["", "| case | ours × base | ours × PEFT | ours × torch | target |", "|---|---:|---:|---:|---|"]
        for case in rest:
            refs = (("base", 2), ("peft", 3), ("torch", 3))
            cells = [fmt_ratio(ratio(case, "ours", ref), digits) for ref, digits in refs]
            lines.append(f"| {case['case']} | " + " | ".join(cells) + f" | {_verdict_text(verdicts(case))} |")
    scale = cases.get("scale", [])
    if scale:
        lines += ["", "| scale (fresh process each) | measured: median (min–max) | target |", "|---|---|---|"]
        for c in scale:
            s = scale_summary(c)
            if c["kind"] == "load":
                measured = (
                    f"load + patch {fmt_ratio(s['load_patch_s_per_gb'], 2)} s/GB; extra RSS "
                    f"{fmt_ratio(s['extra_rss_x'], 2)}× library; peak {fmt_ratio(s['peak_x'], 2)}× library "
                    f"({fmt_bytes(c['info']['library_bytes'])})"
                )
            else:
                measured = (
                    f"{fmt_ratio(s['build_s_per_gib'], 2)} s/GiB input; peak {fmt_ratio(s['peak_output_x'], 2)}× "
                    f"output, {fmt_ratio(s['peak_over_bound'], 2)}× (1.25× output + one adapter)"
                )
            lines.append(f"| {c['case']} | {measured} | {_verdict_text(scale_verdicts(c))} |")
    return "\n".join(lines)


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


__all__ = [
    "TARGETS",
    "SCALE_TARGETS",
    "SECTIONS",
    "ratio",
    "ratios",
    "added",
    "verdicts",
    "scale_summary",
    "scale_verdicts",
    "all_verdicts",
    "from_pytest_json",
    "is_pytest_run",
    "render",
    "summary",
]
