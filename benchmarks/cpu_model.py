"""Model level on the CPU: a random Phi-3 with GenKnowSub experts on its four target modules, prefill and decode,
base against patched (and PEFT's Arrow model), interleaved.

- base: the model as built;
- ours: the very same model object patched (``gkf.patched``) for the timed block and unpatched after it, so base and
  ours read the same weight memory (a deep copy of the base alone decoded 2-5 % slower or faster than the original
  here, which would blur the ratio); patching packs the experts, outside the timed block;
- peft: ``peft.create_arrow_model`` on a copy of the base (float32 only), its GKS and prototypes done by one untimed
  forward first.

Prefill times one forward of the prompt; decode times greedy steps with a KV cache after an untimed 16-token prompt
in a fresh cache, per generated token.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.interleave import Run, block, calls_for
from benchmarks.phi3_shapes import TOP_K

DECODE_PROMPT = 16


@dataclass
class ModelSet:
    """One Phi-3 size in float32 and bfloat16 with its library (and PEFT's model in float32)."""

    size: str
    models: dict[str, torch.nn.Module]  # by dtype name
    library: object  # LoraLibrary
    peft: torch.nn.Module | None
    ids: torch.Tensor  # (1, prompt) token ids
    description: str


def build(size: str, tasks: int, general: int, rank: int, prompt: int, dtypes: list[str], peft: bool) -> ModelSet:
    """A random Phi-3 of ``size``, ``tasks`` + ``general`` synthetic adapters of ``rank`` and the GKS library."""
    import genknowsub_fast as gkf
    from genknowsub_fast.synthetic import make_phi3, write_adapters

    base = make_phi3(size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, tmp, tasks, general, rank=rank)
        lib = gkf.LoraLibrary.from_adapters(ad.task, ad.general, gks="param")
        peft_model = None
        if peft:
            from peft import ArrowConfig, create_arrow_model

            cfg = ArrowConfig(top_k=TOP_K, use_gks=general > 0)
            peft_model = create_arrow_model(copy.deepcopy(base), ad.task, cfg, ad.general or None).eval()
    ids = torch.randint(3, base.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    if peft_model is not None:
        with torch.no_grad():
            peft_model(ids[:, :8])  # PEFT applies GKS and builds its prototypes on its first forward
    models = {d: base if d == "float32" else copy.deepcopy(base).to(getattr(torch, d)) for d in dtypes}
    cfg = next(iter(models.values())).config
    desc = (
        f"Phi-3 hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, E={tasks} r={rank}"
        + (f" + {general} general, GKS" if general else "")
        + f", top-k {TOP_K}"
    )
    return ModelSet(size, models, lib, peft_model, ids, desc)


def patched_run(model: torch.nn.Module, library, run: Run) -> Run:
    """``run`` with ``model`` patched for its duration (patching and unpatching are not timed)."""
    import genknowsub_fast as gkf

    def timed() -> float:
        with gkf.patched(model, library, top_k=TOP_K):
            return run()

    return timed


def decode_run(model: torch.nn.Module, ids: torch.Tensor, steps: int, calls: int = 1) -> Run:
    """Seconds per token of ``steps`` greedy decode steps after an untimed prompt in a fresh KV cache, ``calls``
    times (only the steps are timed; on a GPU the device is synchronised before each clock reading)."""
    from transformers import DynamicCache

    from genknowsub_fast.hf_compat import cache_kwarg

    kw = cache_kwarg(model)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    def run() -> float:
        total = 0.0
        for _ in range(calls):
            cache = DynamicCache()
            tok = model(ids[:, :DECODE_PROMPT], use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = model(tok, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
            sync()
            total += time.perf_counter() - t0
        return total / (steps * calls)

    return run


def _impls(ms: ModelSet, dtype: str, make: Callable[[torch.nn.Module], Run]) -> dict[str, Run]:
    model = ms.models[dtype]
    runs = {"base": make(model), "ours": patched_run(model, ms.library, make(model))}
    if ms.peft is not None and dtype == "float32":
        runs["peft"] = make(ms.peft)
    return runs


def case(ms: ModelSet, section: str, phase: str, dtype: str, tokens: int, block_s: float) -> dict:
    """One interleaved case of ``ms`` in ``dtype``: ``phase`` "prefill" (one forward of ``tokens`` prompt tokens, per
    call) or "decode" (``tokens`` greedy steps, per generated token). Returns the runs, calls per block, the case
    name and its JSON fields, for the ``interleaved`` fixture of benchmarks/conftest.py."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be prefill or decode, got {phase!r}")
    base = ms.models[dtype]
    ids = ms.ids[:, :tokens]
    with torch.no_grad():
        if phase == "prefill":
            calls = calls_for(lambda: base(ids), block_s, max_calls=50)  # also the warm-up

            def make(m, n=calls):
                return _no_grad(block(lambda: m(ids), n))

            what = f"prefill T={tokens}"
        else:
            one = decode_run(base, ms.ids, tokens)()  # also the warm-up of the decode path
            calls = max(1, min(20, round(block_s / (one * tokens))))

            def make(m, n=calls):
                return _no_grad(decode_run(m, ms.ids, tokens, n))

            what = f"decode {tokens} tokens"
    runs = _impls(ms, dtype, make)
    info = dict(size=ms.size, phase=phase, dtype=dtype, tokens=tokens, per="token" if phase == "decode" else "call")
    return dict(runs=runs, calls=dict.fromkeys(runs, calls), name=f"{section} {what} {dtype} ({ms.description})",
                info=info)  # fmt: skip


def _no_grad(run: Run) -> Run:
    def timed() -> float:
        with torch.no_grad():
            return run()

    return timed


__all__ = ["ModelSet", "build", "patched_run", "decode_run", "case"]
