"""The main job, run by ``make demo`` / ``genknowsub-fast demo``.

A random Phi-3 and synthetic task + general adapters in PEFT format → a GenKnowSub library → the patched model,
checked against PEFT's ``create_arrow_model(..., ArrowConfig(use_gks=True))`` and against the float64 reference,
with a base / PEFT / patched speed table and the experts the tokens chose.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from .. import reference
from ..hf_compat import cache_kwarg, peft_without_bitsandbytes
from ..library import LoraLibrary
from ..patching import patch_model, patched, patched_layers


def interleaved_times(
    runs: dict[str, Callable[[], tuple[float, float]]], repeats: int, warmup: int = 1
) -> dict[str, list[tuple[float, float]]]:
    """Each run's (prefill, decode) seconds over ``repeats`` rounds after ``warmup`` discarded rounds; within a round
    every run is timed once, in turn (as the benchmarks do), so a change of machine load meets all of them alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(warmup + repeats):
        for name, run in runs.items():
            result = run()
            if r >= warmup:
                times[name].append(result)
    return times


def machine_isa() -> str:
    """What the timings ran on: torch's CPU capability and the routed CPU kernel's instruction set (or why none)."""
    from ..backends import cpu_kernel

    try:
        kernel = cpu_kernel.isa()
    except ValueError:
        kernel = "not loaded (torch path)"
    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, routed CPU kernel {kernel}"


def ratio_summary(times: list[float], base: list[float]) -> str:
    """The median of the per-round ratios ``times / base`` and their range: ``1.07 (0.98-1.15)``."""
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def decode_time(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per token of greedy decoding with a KV cache, after a prefill of ``prompt``."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        kw = cache_kwarg(model)
        out = model(prompt, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, use_cache=True, **{kw: cache})
            tok = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / max(steps, 1)


def _capture_inputs(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Forward pre-hooks that keep the last input of every patched module, by library module path."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for layer in patched_layers(model).values():

        def hook(_m, args, _path=layer.name):
            seen[_path] = args[0].detach()

        handles.append(layer.module.register_forward_pre_hook(hook))
    return seen, handles


def reference_error(lib: LoraLibrary, inputs: dict[str, torch.Tensor], model, top_k: int, temp: float) -> float:
    """Largest |patched layer delta − float64 reference delta| over the patched modules, relative to the delta."""
    worst = 0.0
    for layer in patched_layers(model).values():
        x = inputs[layer.name].reshape(-1, inputs[layer.name].shape[-1])
        m = lib.modules[layer.name]
        ours = layer.runner(x)
        ref = reference.routed_lora(
            x.double(), m.a.double(), m.b.double(), m.scaling.double(), m.prototypes.double(), top_k, temp
        )
        worst = max(worst, float((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo described in the module docstring; returns 0 when every check passes, 1 otherwise."""
    from peft import ArrowConfig, create_arrow_model

    from ..paths import check_output_dir
    from ..testing import check_phi3_fits, make_phi3, write_adapters

    if args.top_k > args.tasks:
        raise ValueError(f"--top-k {args.top_k} is more than the {args.tasks} task adapters (--tasks)")
    # base, PEFT's copy and the patched copy of the model live at once
    cost = check_phi3_fits(args.size, copies=3)
    out = check_output_dir(args.out, "--out") if args.out else tempfile.mkdtemp(prefix="gkf-demo-")
    torch.manual_seed(args.seed)
    print(
        f"genknowsub_fast demo — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {machine_isa()}, output in {out}"
    )

    t0 = time.perf_counter()
    base = make_phi3(args.size, seed=args.seed)
    cfg = base.config
    print(f"[1/6] {cost}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    ad = write_adapters(base, os.path.join(out, "adapters"), args.tasks, args.general, rank=args.rank, seed=args.seed)
    print(
        f"[2/6] wrote {len(ad.task)} task + {len(ad.general)} general LoRA adapters (rank {args.rank}, PEFT format) "
        f"({time.perf_counter() - t0:.1f} s)"
    )

    t0 = time.perf_counter()
    lib = LoraLibrary.from_adapters(ad.task, ad.general, gks="param")
    lib_path = os.path.join(out, "library.safetensors")
    lib.save(lib_path)
    print(f"[3/6] {lib!r}\n      built in {time.perf_counter() - t0:.2f} s, saved to {lib_path}")

    k = args.top_k
    with warnings.catch_warnings(), peft_without_bitsandbytes():
        warnings.simplefilter("ignore")
        peft_model = create_arrow_model(
            copy.deepcopy(base), ad.task, ArrowConfig(top_k=k, use_gks=True, rng_seed=args.seed), ad.general
        ).eval()
    ours = patch_model(copy.deepcopy(base), LoraLibrary.load(lib_path), top_k=k)

    ids = torch.randint(3, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(args.seed))
    inputs, handles = _capture_inputs(ours)
    with torch.no_grad():
        logits_base = base(ids).logits
        logits_peft = peft_model(ids).logits
        logits_ours = ours(ids).logits
    for h in handles:
        h.remove()
    effect = float((logits_peft - logits_base).abs().max())
    err_peft = float((logits_ours - logits_peft).abs().max())
    err_ref = reference_error(lib, inputs, ours, k, 1.0)
    ok_peft = err_peft <= 1e-4 * max(effect, 1e-6)
    ok_ref = err_ref <= 1e-5
    print(f"[4/6] correctness on {args.tokens} tokens (fp32):")
    print(f"      adapters' effect on the logits (PEFT − base): {effect:.4f}")
    print(
        f"      max |patched − PEFT| logits: {err_peft:.2e} ({err_peft / max(effect, 1e-12):.1e} of the effect) "
        f"{'OK' if ok_peft else 'FAIL'}"
    )
    print(f"      max layer delta error vs float64 reference: {err_ref:.2e} (relative) {'OK' if ok_ref else 'FAIL'}")

    print(
        f"[5/6] speed: base, PEFT and patched timed in turn, {args.repeats} rounds after a warm-up (prefill "
        f"{args.tokens} tokens, decode {args.decode} tokens); median, and the range of the per-round ratio:"
    )

    def timing(model: torch.nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            t0 = time.perf_counter()
            model(ids)
            pre = time.perf_counter() - t0
        return pre, decode_time(model, ids[:, :16], args.decode)

    def patched_timing() -> tuple[float, float]:
        # The base model object itself is patched for its turn, so both read the same weight memory (a deepcopy of
        # the weights alone decoded 2-5 % slower or faster than the original here, which would blur the ratio).
        with patched(base, lib, top_k=k):
            return timing(base)

    times = interleaved_times(
        {"base": lambda: timing(base), "PEFT Arrow": lambda: timing(peft_model), "patched": patched_timing},
        args.repeats,
    )
    base_pre, base_dec = ([t[i] for t in times["base"]] for i in (0, 1))
    print(f"      {'model':<12} {'prefill ms':>11} {'× base (range)':>20} {'decode ms/tok':>14} {'× base (range)':>20}")
    for name, rows in times.items():
        pre, dec = [t[0] for t in rows], [t[1] for t in rows]
        pre_ratio = "1.00" if name == "base" else ratio_summary(pre, base_pre)
        dec_ratio = "1.00" if name == "base" else ratio_summary(dec, base_dec)
        print(
            f"      {name:<12} {statistics.median(pre) * 1e3:>11.1f} {pre_ratio:>20} "
            f"{statistics.median(dec) * 1e3:>14.2f} {dec_ratio:>20}"
        )
    print(
        f"      (indicative: a random '{args.size}' model is small, so per-call costs weigh more than at real "
        "sizes, and other work on this machine moves single timings; benchmarks/ measures real shapes)"
    )

    print("[6/6] experts chosen (top-1 share of the prompt's tokens, first and last patched qkv_proj):")
    from ..ops import arrow_route

    qkv = [p for p in inputs if p.endswith("qkv_proj")] or list(inputs)
    for path in (qkv[0], qkv[-1]):
        _, idx = arrow_route(inputs[path], lib.modules[path].prototypes, k, 1.0)
        share = torch.bincount(idx[:, 0], minlength=lib.num_experts).float() / idx.shape[0]
        print(
            f"      {path}: " + "  ".join(f"{n}={s:.0%}" for n, s in zip(lib.expert_names, share.tolist(), strict=True))
        )
    _demo_plots(lib, ours, out, ad)
    return 0 if (ok_peft and ok_ref) else 1


def _demo_plots(lib: LoraLibrary, model, out: str, ad) -> None:
    try:
        from ..analytics.plots import write_demo_plots
    except ImportError as exc:
        print(f"      (plots skipped: {exc})")
        return
    paths = write_demo_plots(lib, model, os.path.join(out, "plots"), ad.task, ad.general)
    print("      plots: " + ", ".join(paths))
