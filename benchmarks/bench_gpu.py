"""GPU benchmarks of the Triton path in bfloat16, written as a pytest-benchmark-style JSON for write_results.py.

    python -m benchmarks.bench_gpu --json OUT.json [--quick] [--no-model | --model-only]   # repository root, on a GPU

Op level: one Phi-3-mini linear (``benchmarks/phi3_shapes.py``) with E=10 r=4 and E=64 r=8 experts, k=3,
T in {1, 16, 256, 4096}. impls: "base" (F.linear, cuBLAS), "ours" (the prepared Triton layer, as the dispatch table
plans it), "ours_fused" / "ours_cublas" (dense cases at T >= 256: the base GEMM inside the expand kernel, or cuBLAS
then the expand), "peft" (PEFT's ArrowLoraLinearLayer on top of F.linear, eager, where peft is installed), and
"base_graph" / "ours_graph" / "ours_fused_graph" / "ours_cublas_graph" (the same calls replayed from CUDA graphs).

Method:
- every implementation of a case is timed in the same loop, alternately (the order flips every round, so neither
  side always runs first while the clocks ramp), with CUDA events around a batch of ``calls`` calls; the reported
  number is the median over rounds of the time per call;
- weights are rotated: each call uses the next of ``copies`` independent copies of the base weight and of the
  experts, enough copies that a full rotation is 3× the L2 cache, so neither the base nor ours finds its weights
  L2-hot;
- a "*_graph" row is a graph of the same ``calls`` rotated calls, and is reported against "base_graph";
- before timing, ours (and the forced variants) are checked against the float64 reference at the benchmark shape, on
  the first tokens whose top-k margin is clear (``tests/tolerances.py``); a failed check is recorded in the row and
  makes the script exit 1 after writing the JSON.

Model level: a random Phi-3-mini (32 layers, bf16; ``--quick``: the same widths with 4 layers) with 10 task + 3
general rank-8 adapters and GenKnowSub, patched copy vs base, prefill of 512 tokens and greedy decode of 32 tokens,
alternated per round (each decode round starts from a 16-token prompt in a fresh KV cache, inside the timing for both;
reported per generated token). Writing the adapters needs peft; without it the model cases are skipped and say so.

The JSON is rewritten after every case, with ``"interrupted": true`` until the run ends, so a run stopped by a time
budget (SIGINT or SIGTERM) leaves every finished case on disk. Exit status: 0 when every output check passed (an
interrupted run included: what it measured is valid), 1 when an output check failed, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from genknowsub_fast.triton_kernels.dispatch import DENSE_MAX_NA, dense_columns

from benchmarks.phi3_shapes import LIBRARIES, PHI3_MINI_SHAPES, TOP_K
from genknowsub_fast.options import RoutingOptions

DTYPE = torch.bfloat16
TOKENS = (1, 16, 256, 4096)
CHECK_TOKENS = 32
MARGIN = 1e-3  # relative gap between the k-th and (k+1)-th |score| below which a token is not compared


def _calls(t: int) -> int:
    """Calls per timed batch: enough that one batch lasts well over the event and launch latency."""
    return {1: 64, 16: 64, 256: 16}.get(t, 4)


class Layers:
    """``copies`` independent (weight, experts) sets of one case on the GPU, and every implementation's call."""

    def __init__(self, d_in: int, d_out: int, e: int, r: int, copies: int, seed: int = 0):
        from genknowsub_fast.backends import triton_ops
        from genknowsub_fast.backends.packing import pack_experts

        self.d_in, self.d_out, self.e, self.r = d_in, d_out, e, r
        self.sets = []
        g = torch.Generator(device="cuda").manual_seed(seed)
        for _ in range(copies):
            a = torch.randn(e, r, d_in, device="cuda", generator=g) / d_in**0.5
            b = torch.randn(e, d_out, r, device="cuda", generator=g) / r**0.5
            p = torch.randn(e, d_in, device="cuda", generator=g)
            p = p / p.norm(dim=1, keepdim=True)
            scaling = torch.full((e,), 2.0, device="cuda")
            packed = pack_experts(a, b, scaling, p, dtype=DTYPE, device="cuda")
            weight = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5).to(DTYPE)
            layers = {"ours": triton_ops.prepare(packed, RoutingOptions(TOP_K))}
            if dense_columns(e, r) <= DENSE_MAX_NA:
                opts = RoutingOptions(TOP_K)
                layers["ours_fused"] = triton_ops.prepare(packed, opts, regime="dense", fuse_base=True)
                layers["ours_cublas"] = triton_ops.prepare(packed, opts, regime="dense", fuse_base=False)
            self.sets.append(dict(a=a, b=b, p=p, scaling=scaling, weight=weight, **layers))

    def fn(self, impl: str, i: int):
        """The call of ``impl`` on copy i (x → y)."""
        s = self.sets[i % len(self.sets)]
        if impl == "base":
            return lambda x: F.linear(x, s["weight"])
        if impl == "peft":
            if "peft" not in s:
                from benchmarks.peft_arrow import peft_arrow_linear

                s["peft"] = peft_arrow_linear(s["weight"], s["a"].to(DTYPE), s["b"].to(DTYPE), 2.0, "cuda")
            return s["peft"]
        layer = s[impl]
        return lambda x: layer(x, s["weight"])

    def check(self, impl: str, x: torch.Tensor) -> str:
        """'ok (n tokens)' when ``impl`` matches the float64 reference on the first clear-margin tokens, else why."""
        from genknowsub_fast import reference
        from tests.tolerances import assert_close_to_reference

        s = self.sets[0]
        with torch.no_grad():
            y = self.fn(impl, 0)(x).float()
        x64, p64 = x.double(), s["p"].double()
        top = (x64 @ p64.T).abs().topk(min(TOP_K + 1, self.e), dim=1).values
        if self.e > TOP_K:
            margin = (top[:, TOP_K - 1] - top[:, -1]) / top[:, 0]
        else:
            margin = torch.ones(len(x), device="cuda")
        keep = torch.nonzero(margin > MARGIN).flatten()[:CHECK_TOKENS]
        if len(keep) == 0:
            return "no token with a clear margin"
        args = [x[keep], s["a"], s["b"], s["scaling"], s["p"]]
        w = s["weight"]

        def ref(dt):
            cast = [t.to(dt) for t in args]
            return reference.routed_lora(*cast, TOP_K, 1.0, "output", w.to(dt), None)

        try:
            assert_close_to_reference(y[keep].cpu(), ref(torch.float64).cpu(), ref(DTYPE).cpu(), DTYPE, impl)
        except AssertionError as exc:
            return f"FAILED: {exc}"
        return f"ok ({len(keep)} tokens)"


def copies_for(d_in: int, d_out: int, e: int, r: int) -> int:
    """Copies whose weights together are at least 3× the L2 cache (at least 2)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    per = (d_out * d_in + e * r * (d_in + d_out)) * 2 + e * d_in * 4 * 2
    return max(2, math.ceil(3 * l2 / per))


def batch(layers: Layers, impl: str, x: torch.Tensor, calls: int):
    """``calls`` rotated calls of impl: a callable running them eagerly."""
    fns = [layers.fn(impl, i) for i in range(calls)]

    def run():
        for f in fns:
            f(x)

    return run


def graphed(run) -> callable:
    """``run`` captured once into a CUDA graph (warmed up on a side stream first); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def time_alternating(runs: dict[str, callable], calls: int, rounds: int) -> dict[str, list[float]]:
    """Per-call seconds of each run, per round; the order of the runs flips every round."""
    names = list(runs)
    for name in names:  # warm-up (JIT compiles, cuBLAS heuristics, clocks)
        runs[name]()
    torch.cuda.synchronize()
    events = {n: [] for n in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runs[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {n: [s.elapsed_time(e) * 1e-3 / calls for s, e in ev] for n, ev in events.items()}


def _row(group: str, impl: str, per_call: list[float], **info) -> dict:
    q = statistics.quantiles(per_call, n=4) if len(per_call) >= 2 else [per_call[0]] * 3
    stats = dict(median=statistics.median(per_call), min=min(per_call), max=max(per_call), iqr=q[2] - q[0],
                 rounds=len(per_call))  # fmt: skip
    info.update(impl=impl, calls=1, device=torch.cuda.get_device_name())
    return {"group": group, "name": f"{group}[{impl}]", "extra_info": info, "stats": stats}


def op_cases(quick: bool):
    """(module, lib, T) of the op benchmarks; ``quick``: two modules, T in {1, 4096}."""
    modules = ["qkv_proj", "o_proj"] if quick else list(PHI3_MINI_SHAPES)
    tokens = (1, 4096) if quick else TOKENS
    return [(m, lib, t) for m in modules for lib in LIBRARIES for t in tokens]


def has_peft() -> bool:
    """Whether peft is importable (the PEFT rows and the model cases' adapters need it)."""
    return importlib.util.find_spec("peft") is not None


def bench_ops(quick: bool, rounds: int, progress, rows: list[dict], save=lambda: None) -> int:
    """Append the rows of every op case to ``rows`` (calling ``save`` after each case); returns the number of failed
    output checks. PEFT rows only where peft is installed."""
    from benchmarks import gpu_model

    dev = gpu_model.DEVICES["h200" if "H200" in torch.cuda.get_device_name() else "h100"]
    with_peft = has_peft()
    failed = 0
    for module, lib, t in op_cases(quick):
        d_in, d_out = PHI3_MINI_SHAPES[module]
        e, r = LIBRARIES[lib]
        torch.cuda.empty_cache()
        layers = Layers(d_in, d_out, e, r, copies_for(d_in, d_out, e, r))
        x = torch.randn(t, d_in, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(DTYPE)
        group = f"gpu op {module} {d_in}->{d_out} T={t} {lib} bf16"
        dense = "ours_fused" in layers.sets[0] and t >= 256
        ours = ["ours"] + (["ours_fused", "ours_cublas"] if dense else [])
        checks = {impl: layers.check(impl, x) for impl in ours}
        failed += sum(c.startswith("FAILED") for c in checks.values())
        calls = _calls(t)
        with torch.no_grad():
            eager = {impl: batch(layers, impl, x, calls) for impl in ["base", *ours]}
            graphs = {f"{impl}_graph": graphed(run) for impl, run in eager.items()}
            times = time_alternating({**eager, **graphs}, calls, rounds)
            if with_peft:
                peft_calls = 1 if t >= 256 else 4
                times.update(time_alternating({"peft": batch(layers, "peft", x, peft_calls)}, peft_calls, 3))
        for impl, per_call in times.items():
            info = dict(module=module, library=lib, tokens=t, copies=len(layers.sets), calls_per_batch=calls)
            plain = impl.removesuffix("_graph")
            if plain in checks:
                info["output_check"] = checks[plain]
                fuse = {"ours_fused": True, "ours_cublas": False}.get(plain)
                info["predicted_ratio"] = round(gpu_model.predict(module, lib, t, dev, fuse).ratio, 3)
            rows.append(_row(group, impl, per_call, **info))
        progress(f"{group}: " + ", ".join(f"{k} {statistics.median(v) * 1e6:.1f} µs" for k, v in times.items()))
        save()
        del layers, eager, graphs
    return failed


def model_layers(quick: bool) -> int:
    """Decoder layers of the model cases: Phi-3-mini's 32, or 4 of the same width in quick mode."""
    return 4 if quick else 32


def model_case(quick: bool = False) -> str:
    """The model cases' description, as the JSON and RESULTS_gpu.md name it."""
    return f"Phi-3-mini {model_layers(quick)} layers bf16, E=10 r=8 + 3 general, GKS"


def model_setup(quick: bool = False) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The model benchmark's random Phi-3-mini on the GPU (bf16, ``model_layers(quick)`` layers), a patched copy
    (10 task + 3 general rank-8 adapters, GKS) and 512 prompt token ids."""
    import tempfile

    from transformers import Phi3ForCausalLM

    import genknowsub_fast as gkf
    from genknowsub_fast.synthetic import phi3_config, write_adapters

    cfg = phi3_config("phi3-mini")
    cfg.num_hidden_layers = model_layers(quick)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = Phi3ForCausalLM(cfg).to(DTYPE).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, tmp, 10, 3, rank=8)
        lib = gkf.LoraLibrary.from_adapters(ad.task, ad.general, gks="param")
    ours = gkf.patch_model(copy.deepcopy(base), lib, top_k=TOP_K)
    ids = torch.randint(3, base.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0)).cuda()
    return base, ours, ids


def bench_model(rounds: int, progress, rows: list[dict] | None = None, save=lambda: None, quick: bool = False):
    """Prefill 512 and decode 32 tokens: random Phi-3-mini (``model_layers(quick)`` layers), base vs patched
    (Triton), alternated per round; appends to ``rows`` and calls ``save`` after each case. Returns the rows."""
    from transformers import DynamicCache

    from genknowsub_fast.hf_compat import cache_kwarg

    rows = [] if rows is None else rows
    base, ours, ids = model_setup(quick)
    models = {"base": base, "ours": ours}

    def prefill(model):
        return lambda: model(ids)

    def decode(model):
        kw = cache_kwarg(model)

        def run():
            cache = DynamicCache()
            tok = model(ids[:, :16], use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
            for _ in range(32):
                tok = model(tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)

        return run

    case = model_case(quick)
    with torch.no_grad():
        for name, make, calls, group in (
            ("prefill", prefill, 1, f"gpu model prefill T=512 ({case})"),
            ("decode", decode, 32, f"gpu model decode 32 tokens ({case})"),
        ):
            times = time_alternating({impl: make(m) for impl, m in models.items()}, calls, rounds)
            rows += [_row(group, impl, v, tokens=512 if name == "prefill" else 32) for impl, v in times.items()]
            progress(f"{group}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in times.items()))
            save()
    return rows


def write_json(path: str, rows: list[dict], interrupted: bool, notes: list[str]) -> None:
    """The pytest-benchmark-style JSON of the rows so far (written atomically: a reader never sees half a file)."""
    import triton

    data = {
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine_info": {"cpu": {"brand_raw": platform.processor() or platform.machine()}},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name()},
        "interrupted": interrupted,
        "notes": notes,
        "benchmarks": rows,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the results here (pytest-benchmark layout)")
    parser.add_argument("--quick", action="store_true", help="two modules, T in {1, 4096}; a 4-layer model")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-model", action="store_true", help="op level only")
    group.add_argument("--model-only", action="store_true", help="model level only")
    parser.add_argument("--rounds", type=int, default=15)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    rows: list[dict] = []
    notes: list[str] = []
    failed = 0

    def save() -> None:
        write_json(args.json, rows, True, notes)

    # A stage budget ends the run with SIGINT (or SIGTERM): stop where it is, keep what was measured.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    interrupted = False
    try:
        save()
        if not args.model_only:
            failed = bench_ops(args.quick, args.rounds, progress, rows, save)
        if not args.no_model:
            if has_peft():
                bench_model(max(3, args.rounds // 3), progress, rows, save, args.quick)
            else:
                notes.append("model cases skipped: peft is not installed (it writes the synthetic adapters)")
                progress(notes[-1])
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: the rows measured so far are in the JSON")
    write_json(args.json, rows, interrupted, notes)
    progress(f"wrote {args.json} ({len(rows)} rows{', interrupted' if interrupted else ''}); output checks failed: "
             f"{failed}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
