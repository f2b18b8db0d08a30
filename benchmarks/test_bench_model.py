"""Model level, CPU fp32: a random Phi-3 (hidden 1024, 4 layers), 10 task + 3 general adapters (r=8) on all four
targets with GenKnowSub — prefill of 512 tokens and decode of 32 tokens: base, PEFT's Arrow model, patched."""

import contextlib
import copy
import warnings

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast.synthetic import make_phi3, write_adapters

PREFILL = 512
DECODE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from peft import ArrowConfig, create_arrow_model

    base = make_phi3("bench")
    ad = write_adapters(base, tmp_path_factory.mktemp("bench_adapters"), 10, 3, rank=8)
    lib = gkf.LoraLibrary.from_adapters(ad.task, ad.general, gks="param")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = create_arrow_model(copy.deepcopy(base), ad.task, ArrowConfig(top_k=3, use_gks=True), ad.general)
    ids = torch.randint(3, base.config.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_model(ids[:, :8])  # PEFT applies GKS and builds its prototypes on the first forward: not timed
    return {
        "base": base,
        "peft": peft_model.eval(),
        "lib": lib,
        "ids": ids,
    }


@contextlib.contextmanager
def _model(models, impl):
    """The model to time. "ours" patches the very base model object (unpatched on exit), so base and ours read the
    same weight memory: a deepcopy of the base ran 2-5 % slower than the original in decode here, on its own."""
    if impl == "ours":
        with gkf.patched(models["base"], models["lib"], top_k=3) as model:
            yield model
    else:
        yield models[impl]


@pytest.mark.parametrize("impl", ["base", "peft", "ours"])
def test_prefill(benchmark, models, impl):
    ids = models["ids"]
    benchmark.group = f"model prefill T={PREFILL} (Phi-3 hidden 1024, 4 layers, E=10 r=8, GKS)"
    benchmark.extra_info.update(impl=impl, tokens=PREFILL)
    with _model(models, impl) as model, torch.no_grad():
        benchmark.pedantic(lambda: model(ids), rounds=9, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["base", "peft", "ours"])
def test_decode(benchmark, models, impl):
    from transformers import DynamicCache

    ids = models["ids"]
    benchmark.group = f"model decode {DECODE} tokens (Phi-3 hidden 1024, 4 layers, E=10 r=8, GKS)"
    benchmark.extra_info.update(impl=impl, tokens=DECODE)

    def prefill(model):  # untimed: a 16-token prompt into a fresh KV cache
        cache = DynamicCache()
        with torch.no_grad():
            out = model(ids[:, :16], past_key_values=cache, use_cache=True)
        return (model, cache, out.logits[:, -1:].argmax(-1)), {}

    def decode(model, cache, tok):
        with torch.no_grad():
            for _ in range(DECODE):
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    with _model(models, impl) as model:
        benchmark.pedantic(decode, setup=lambda: prefill(model), rounds=9, iterations=1, warmup_rounds=1)
