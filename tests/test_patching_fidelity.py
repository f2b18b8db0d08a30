"""Patched layers at the public level: float32 routing scores on half-precision models, the lower-index tie rule, and
GPT-2's Conv1D targets (fused, with a base part equal to Conv1D's own forward bit for bit)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, patched_layers, reference
from genknowsub_fast.experts import ModuleExperts
from tests.tolerances import FP32_SCORES, assert_close_to_reference


def _layer_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Every patched layer's inputs during ``model(ids)``, as (T, d_in), by library path."""
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = patched_layers(model).values()
    for layer in layers:
        layer.recorder = lambda lay, x: inputs.setdefault(lay.name, []).append(x.detach().reshape(-1, x.shape[-1]))
    with torch.no_grad():
        model(ids)
    for layer in layers:
        layer.recorder = None
    return {k: torch.cat(v) for k, v in inputs.items()}


def _near_ties(protos: torch.Tensor, dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs in ``dtype`` whose scores put one expert clearly first and two others 1e-4 to 3e-3 apart (relative)
    for the second place: margins float32 scores resolve and half-precision scores may not."""
    g = torch.Generator().manual_seed(seed)
    e = protos.shape[0]
    scores = 0.2 * torch.rand(n, e, generator=g, dtype=torch.float64)
    for i in range(n):
        first, a, b = torch.randperm(e, generator=g)[:3].tolist()
        gap = 10 ** (-4 + 1.5 * float(torch.rand(1, generator=g)))
        scores[i, first], scores[i, a], scores[i, b] = 3.0, 1.0, 1.0 + gap
    return (scores @ torch.linalg.pinv(protos.double()).T).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_routes_with_float32_scores(phi3_setup, dtype):
    """On a bf16 / fp16 model, each patched layer routes its own inputs as float64 scores do, on every token whose
    top-k margin is clear of float32 rounding, and its output follows that routing. The inputs are the layers' own
    (8 × 128 tokens) plus near-tied ones built from the prototypes; the precondition is that some of them are routed
    differently by scores computed in the model's dtype."""
    k = 2
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    model = gkf.patch_model(copy.deepcopy(phi3_setup.base).to(dtype), lib, top_k=k, temperature=0.5)
    ids = torch.randint(3, phi3_setup.base.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    inputs = _layer_inputs(model, ids)
    discriminating = 0
    for i, layer in enumerate(patched_layers(model).values()):
        m = lib.modules[layer.name]
        x = torch.cat([inputs[layer.name], _near_ties(m.prototypes, dtype, 64, seed=i)])
        logits64 = (x.double() @ m.prototypes.double().T).abs()
        top = logits64.sort(dim=1, descending=True).values
        bound = FP32_SCORES["atol"] + FP32_SCORES["rtol"] * top[:, k - 1]
        clear = top[:, k - 1] - top[:, k] > 2 * bound
        sel64 = logits64.topk(k).indices.sort(dim=1).values
        sel_low = (x @ m.prototypes.to(dtype).T).abs().float().topk(k).indices.sort(dim=1).values
        flips = (sel_low != sel64).any(1) & clear
        discriminating += int(flips.sum())

        w, idx = layer.runner.route(x)
        assert w.dtype == torch.float32
        assert torch.equal(idx.sort(dim=1).values[clear], sel64[clear]), layer.name
        # The layer's output on the tokens half-precision scores would route elsewhere, and on 32 others.
        xc = x[flips | (clear & (clear.cumsum(0) <= 32))]
        w64, idx64 = reference.route(xc.double(), m.prototypes.double(), k, 0.5)
        with torch.no_grad():
            ours, delta = layer.module(xc), layer.runner(xc)

        def ref(dt, base=True, xc=xc, w64=w64, idx64=idx64, m=m, lin=layer.module):
            delta = reference.expand_with_routing(
                xc.to(dt), m.a.to(dt), m.b.to(dt), m.scaling.to(dt), w64.to(dt), idx64
            )
            return xc.to(dt) @ lin.weight.to(dt).T + delta if base else delta

        # The delta alone (the bound scales with |y|, which the base output would dominate), then the whole output.
        assert_close_to_reference(delta, ref(torch.float64, False), ref(dtype, False), dtype, f"{layer.name} delta")
        assert_close_to_reference(ours, ref(torch.float64), ref(dtype), dtype, layer.name)
    assert discriminating > 0, "precondition: some clear-margin tokens are routed differently by low-precision scores"


def test_ties_go_to_the_lower_index(phi3_setup):
    weights, idx = gkf.arrow_route(torch.zeros(2, 64), torch.eye(64)[:40], 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert torch.allclose(weights, torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_layer_breaks_ties_to_the_lower_index(phi3_setup, dtype):
    """Experts 1 and 2 share A and the prototype, expert 2 has twice expert 1's B: their scores tie exactly. On inputs
    whose scores are (3, 1, 1, 0.2, 0.1) + noise with top_k = 2, expert 0 is first and the tie for the second place
    goes to expert 1, not 2."""
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    path = "model.layers.0.self_attn.o_proj"
    m = lib.modules[path]
    a, b, protos = m.a.clone(), m.b.clone(), m.prototypes.clone()
    a[2], b[2], protos[2] = a[1], 2 * b[1], protos[1]
    lib.modules[path] = ModuleExperts(a, b, m.scaling, protos, m.ranks)
    model = gkf.patch_model(copy.deepcopy(phi3_setup.base).to(dtype), lib, top_k=2)
    layer = patched_layers(model)[path]
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([3.0, 1.0, 1.0, 0.2, 0.1], dtype=torch.float64) + 0.01 * torch.randn(5, 5, generator=g)
    target[:, 2] = target[:, 1]
    x = (target @ torch.linalg.pinv(protos.double()).T).to(dtype)  # scores x·p_e = target (rows 1 and 2 equal)
    logits64 = (x.double() @ protos.double().T).abs()
    assert torch.equal(logits64[:, 1], logits64[:, 2]), "precondition: an exact tie"
    assert bool((logits64[:, 0] > logits64[:, 1]).all() and (logits64[:, 1:2] > logits64[:, 3:]).all())
    _, idx = layer.runner.route(x)
    assert idx.tolist() == [[0, 1]] * 5
    with torch.no_grad():
        ours, delta = layer.module(x), layer.runner(x)

    def ref(dt, base=True):
        w = layer.module.weight.to(dt) if base else None
        return reference.routed_lora(x.to(dt), a.to(dt), b.to(dt), m.scaling.to(dt), protos.to(dt), 2, 1.0, weight=w)

    assert_close_to_reference(delta, ref(torch.float64, False), ref(dtype, False), dtype, "tie delta")
    assert_close_to_reference(ours, ref(torch.float64), ref(dtype), dtype, "tie")


# ---------------------------------------------------------------------------------------------------- GPT-2 Conv1D
@pytest.fixture(scope="module")
def gpt2_adapters(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from genknowsub_fast.synthetic import write_adapters

    cfg = GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, tmp_path_factory.mktemp("gpt2"), 3, 1, target_modules=("c_attn", "c_proj"))
    return base, ad


def test_conv1d_targets_are_fused_with_a_bit_exact_base(gpt2_adapters):
    """GPT-2 stores Conv1D weights (d_in, d_out). A patched Conv1D is fused (one runner call with ``W.t()``), and its
    base part is Conv1D's own forward bit for bit: with all-zero B the patched layer returns exactly what it did."""
    base, ad = gpt2_adapters
    lib = LoraLibrary.from_adapters(ad.task, ad.general)
    model = gkf.patch_model(copy.deepcopy(base), lib, top_k=2)
    layers = patched_layers(model)
    assert {type(lay.module).__name__ for lay in layers.values()} == {"Conv1D"}
    assert len(layers) == 6  # c_attn, attn.c_proj and mlp.c_proj of two layers
    assert all(lay.fused for lay in layers.values())
    conv = model.transformer.h[0].attn.c_attn
    m = lib.modules["transformer.h.0.attn.c_attn"]
    for t in (1, 7, 64):
        x = torch.randn(t, 32, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ours = conv(x)

        def ref(dt, x=x):
            return reference.routed_lora(
                x.to(dt), m.a.to(dt), m.b.to(dt), m.scaling.to(dt), m.prototypes.to(dt), 2, 1.0,
                weight=conv.weight.t().to(dt), bias=conv.bias.to(dt),
            )  # fmt: skip

        assert_close_to_reference(ours, ref(torch.float64), ref(torch.float32), torch.float32, f"c_attn T={t}")

    zero_b = {p: ModuleExperts(e.a, 0 * e.b, e.scaling, e.prototypes, e.ranks) for p, e in lib.modules.items()}
    zero = LoraLibrary(zero_b, lib.expert_names)
    plain = copy.deepcopy(base)
    patched = gkf.patch_model(copy.deepcopy(base), zero, top_k=2)
    for t in (1, 7, 64):
        x = torch.randn(t, 32, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            assert torch.equal(patched.transformer.h[1].attn.c_attn(x), plain.transformer.h[1].attn.c_attn(x))
            h = torch.randn(t, 32, generator=torch.Generator().manual_seed(100 + t))
            assert torch.equal(patched.transformer.h[1].attn.c_proj(h), plain.transformer.h[1].attn.c_proj(h))
