"""GenKnowSub maths (genknowsub_fast/gks.py) and every variant of the original GenKnowSub code.

The variants are re-derived here from the original code's semantics, step by step as it applies them to the factors
(its organiser replaces A and B of each task adapter by the same combination), in float64, from the adapter files:
nothing of this package's combination code is used for the expected values. Each is then compared with the
library its README recipe builds, and a model patched with that library (top-3, T = 1, "weights" mixing with the
first expert's scaling, |x·p| routing) with a per-token float64 forward written from the same semantics.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, gks, reference
from genknowsub_fast.library.adapters import read_adapter
from tests.tolerances import FLOAT64_EXACT, FP32_PRODUCT, PROTOTYPE_MIN_COS, assert_close_to_reference


# ------------------------------------------------------------------------------------------------ gks.py on tensors
def _factors(n, r=3, d_in=10, d_out=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype))
            for _ in range(n)]  # fmt: skip


def test_default_mean_is_pefts_stack_mean_bit_for_bit():
    task, general = _factors(3, dtype=torch.float32), _factors(3, seed=1, dtype=torch.float32)
    out = gks.combine_param(task, general)
    mean_a = torch.stack([a for a, _ in general]).mean(0)
    mean_b = torch.stack([b for _, b in general]).mean(0)
    for (a, b), (ta, tb) in zip(out, task, strict=True):
        assert torch.equal(a, ta - mean_a) and torch.equal(b, tb - mean_b)


def test_combine_param_matches_reference():
    task, general, add = _factors(2), _factors(3, seed=1), _factors(2, seed=2)
    gw, aw, t = [0.2, -0.5, 1.5], [1.0, -1.0], 0.5
    out = gks.combine_param(task, general, gw, add, aw, t)
    for (a, b), (ta, tb) in zip(out, task, strict=True):
        ea = reference.combine_factors(ta, [f for f, _ in general], gw, [f for f, _ in add], aw, t)
        eb = reference.combine_factors(tb, [f for _, f in general], gw, [f for _, f in add], aw, t)
        torch.testing.assert_close(a, ea, rtol=0, atol=FLOAT64_EXACT)
        torch.testing.assert_close(b, eb, rtol=0, atol=FLOAT64_EXACT)


def test_combine_delta_is_the_same_combination_of_delta_w():
    task, general, add = _factors(2), _factors(2, seed=1), _factors(1, seed=2)
    s = [2.0, 0.5, 3.0, 1.5, 4.0]
    gw, aw, t = [0.3, 0.7], [-1.0], 0.5
    out = gks.combine_delta(
        [(a, b, s[i]) for i, (a, b) in enumerate(task)],
        [(a, b, s[2 + i]) for i, (a, b) in enumerate(general)],
        gw,
        [(a, b, s[4]) for a, b in add],
        aw,
        t,
    )
    for i, (a, b, scale) in enumerate(out):
        expected = t * s[i] * task[i][1] @ task[i][0]
        expected = expected - sum(w * s[2 + g] * bg @ ag for g, (w, (ag, bg)) in enumerate(zip(gw, general)))
        expected = expected + aw[0] * s[4] * add[0][1] @ add[0][0]
        assert scale == 1.0 and a.shape[0] == 3 * 4
        torch.testing.assert_close(b @ a, expected, rtol=0, atol=FLOAT64_EXACT)


def test_resolve_gks():
    assert gks.resolve_gks("auto", 2) == "param" and gks.resolve_gks("auto", 0) is None
    assert gks.resolve_gks("delta", 1, 1) == "delta" and gks.resolve_gks(None, 0) is None
    for args, match in (
        (("param", 0), "no general adapters"),
        (("delta", 0), "no general adapters"),
        ((None, 2), "gks=None"),
        (("auto", 0, 1), "add_adapters"),
        (("mean", 1), "gks must be"),
    ):
        with pytest.raises(ValueError, match=match):
            gks.resolve_gks(*args)
    with pytest.raises(ValueError, match="2 entries for 3"):
        gks.check_weights([1.0, 2.0], 3)
    for bad in (float("nan"), True, "1"):
        with pytest.raises(ValueError, match="finite number"):
            gks.check_weight(bad, "task_weight")


# ---------------------------------------------------------------------------------- the original code's variants
S, T, E2 = 0, 1, 2  # indices of the source-language, target-language and third general modules


@pytest.fixture(scope="module")
def phi3_orig(tmp_path_factory):
    """Phi-3 with the original's targets (o_proj, qkv_proj), r=4, lora_alpha=16 (scaling 4): 4 tasks, 3 generals."""
    from genknowsub_fast.synthetic import make_phi3, write_adapters

    base = make_phi3("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, tmp_path_factory.mktemp("orig3"), 4, 3, lora_alpha=16,
                            target_modules=("o_proj", "qkv_proj"), seed=3)  # fmt: skip
    return base, ad


@pytest.fixture(scope="module")
def phi2_orig(tmp_path_factory):
    """Phi-2 with the phi2 branch's targets (q_proj, k_proj, v_proj, dense), all 64→64: 4 tasks, 3 generals."""
    from genknowsub_fast.synthetic import make_phi2, write_adapters

    base = make_phi2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, tmp_path_factory.mktemp("orig2"), 4, 3, lora_alpha=16,
                            target_modules=("q_proj", "k_proj", "v_proj", "dense"), seed=4)  # fmt: skip
    return base, ad


def _main_gks(f, tasks, g):  # main, --disentanglement_method subtract, functional only
    return f - 1.0 * g[S]


def _main_cross(f, tasks, g):  # main, cross-lingual: alpha = beta = 0.5
    return 0.5 * (f - g[S]) + 0.5 * g[T]


def _newidea_gks(f, tasks, g):  # new-idea: a third of the source module
    return f - g[S] / 3


def _newidea_cross(f, tasks, g):  # new-idea, cross-lingual: the target module added with weight 1
    return (f - g[S] / 3) + g[T]


def _newidea_avg(f, tasks, g):  # new-idea, --factorize_average_lora, functional only
    return f - sum(tasks) / len(tasks)


def _newidea_avg_cross(f, tasks, g):
    return (f - sum(tasks) / len(tasks)) + g[T]


def _phi2_gks(f, tasks, g):  # phi2: a third of each of three general modules, one after the other
    return ((f - g[S] / 3) - g[T] / 3) - g[E2] / 3


def _phi2_cross(f, tasks, g):  # phi2, cross-lingual: alpha = beta = 1, the target module subtracted
    return 1.0 * (f - g[S] / 3) - 1.0 * g[T]


def _phi2_avg(f, tasks, g):  # phi2, average of the tasks: three calls, each subtracting a third of it
    avg = sum(tasks) / len(tasks)
    return ((f - avg / 3) - avg / 3) - avg / 3


def _phi2_avg_cross(f, tasks, g):  # the source path is unused in average mode
    return 1.0 * (f - sum(tasks) / len(tasks) / 3) - 1.0 * g[T]


def _recipe(name, ad):
    """The README's from_adapters arguments for each variant."""
    s, t, e2 = ad.general
    n = len(ad.task)
    return {
        "main-plain": {},
        "main-gks": {"general_adapters": [s]},
        "main-cross": {"general_adapters": [s], "general_weights": [0.5], "add_adapters": [t],
                       "add_weights": [0.5], "task_weight": 0.5},
        "newidea-gks": {"general_adapters": [s], "general_weights": [1 / 3]},
        "newidea-cross": {"general_adapters": [s], "general_weights": [1 / 3], "add_adapters": [t]},
        "newidea-avg": {"general_adapters": ad.task},
        "newidea-avg-cross": {"general_adapters": ad.task, "add_adapters": [t]},
        "phi2-gks": {"general_adapters": [s, t, e2], "prototype_scope": "layer"},
        "phi2-cross": {"general_adapters": [s], "general_weights": [1 / 3], "add_adapters": [t],
                       "add_weights": [-1.0], "prototype_scope": "layer"},
        "phi2-avg": {"general_adapters": ad.task, "prototype_scope": "layer"},
        "phi2-avg-cross": {"general_adapters": ad.task, "general_weights": [1 / (3 * n)] * n,
                           "add_adapters": [t], "add_weights": [-1.0], "prototype_scope": "layer"},
    }[name]  # fmt: skip


VARIANTS = {
    "main-plain": (lambda f, tasks, g: f, "phi3_orig"),
    "main-gks": (_main_gks, "phi3_orig"),
    "main-cross": (_main_cross, "phi3_orig"),
    "newidea-gks": (_newidea_gks, "phi3_orig"),
    "newidea-cross": (_newidea_cross, "phi3_orig"),
    "newidea-avg": (_newidea_avg, "phi3_orig"),
    "newidea-avg-cross": (_newidea_avg_cross, "phi3_orig"),
    "phi2-gks": (_phi2_gks, "phi2_orig"),
    "phi2-cross": (_phi2_cross, "phi2_orig"),
    "phi2-avg": (_phi2_avg, "phi2_orig"),
    "phi2-avg-cross": (_phi2_avg_cross, "phi2_orig"),
}


def _original_experts(ad, combine):
    """Per module: the combined factors A (E, r, d_in), B (E, d_out, r) in float64 and the scalings, from the files."""
    tasks = [read_adapter(p) for p in ad.task]
    general = [read_adapter(p) for p in ad.general]
    out = {}
    for path in tasks[0].module_paths:
        fa = [t.a[path].double() for t in tasks]
        fb = [t.b[path].double() for t in tasks]
        ga = [g.a[path].double() for g in general]
        gb = [g.b[path].double() for g in general]
        a = torch.stack([combine(f, fa, ga) for f in fa])
        b = torch.stack([combine(f, fb, gb) for f in fb])
        out[path] = (a, b, [t.scaling[path] for t in tasks])
    return out


def _original_prototypes(experts, layer_scope):
    """The original's prototypes: exact top right singular vector of B·A per module (main, new-idea), or of the
    unscaled sum over q, k, v and dense of the decoder layer (phi2), shared by the four."""
    if not layer_scope:
        return {p: reference.prototypes_svd(a, b) for p, (a, b, _) in experts.items()}
    out = {}
    for layer in {p.rsplit(".", 2)[0] for p in experts}:
        members = [p for p in experts if p.startswith(layer + ".")]
        proto = reference.prototypes_of_sum_svd([experts[p][0] for p in members], [experts[p][1] for p in members])
        out.update({p: proto for p in members})
    return out


def _original_forward(x, w0, bias, a, b, scaling0, protos, top_k):
    """One token at a time: |x·p| logits, top-k, softmax over all E with -inf outside the top-k, merged
    A and B weighted per token, the first expert's scaling once: ``W0 x + b + s (Σ w B)(Σ w A) x``."""
    out = []
    for xt in x:
        logits = (xt @ protos.T).abs()
        idx = logits.topk(top_k).indices
        full = torch.full_like(logits, float("-inf")).scatter(0, idx, logits[idx])
        w = torch.softmax(full, dim=0)
        a_bar, b_bar = torch.einsum("e,erd->rd", w, a), torch.einsum("e,eor->or", w, b)
        y = w0 @ xt + scaling0 * (b_bar @ (a_bar @ xt))
        out.append(y + bias if bias is not None else y)
    return torch.stack(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_variant(request, variant):
    combine, fixture = VARIANTS[variant]
    base, ad = request.getfixturevalue(fixture)
    layer_scope = variant.startswith("phi2")
    expected = _original_experts(ad, combine)
    protos = _original_prototypes(expected, layer_scope)
    lib = LoraLibrary.from_adapters(ad.task, **_recipe(variant, ad))
    assert lib.prototype_scope == ("layer" if layer_scope else "module")
    for path, (a, b, scalings) in expected.items():
        m = lib.modules[path]
        torch.testing.assert_close(m.a.double(), a, **FP32_PRODUCT)
        torch.testing.assert_close(m.b.double(), b, **FP32_PRODUCT)
        assert m.scaling.tolist() == scalings
        assert float((m.prototypes.double() * protos[path]).sum(1).abs().min()) >= PROTOTYPE_MIN_COS
    if layer_scope:
        layer0 = [m.prototypes for p, m in lib.modules.items() if p.startswith("model.layers.0.")]
        assert len(layer0) == 4 and all(torch.equal(p, layer0[0]) for p in layer0)

    # End to end: a model patched with the recipe, layer by layer on its own inputs, against the original forward.
    model = gkf.patch_model(copy.deepcopy(base), lib, top_k=3, temperature=1.0, mixing="weights")
    inputs = {}
    for layer in gkf.patched_layers(model).values():
        layer.recorder = lambda lay, x: inputs.setdefault(lay.name, x.detach().reshape(-1, x.shape[-1]).clone())
    ids = torch.randint(3, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for layer in gkf.patched_layers(model).values():
        layer.recorder = None
        a, b, scalings = expected[layer.name]
        x, lin = inputs[layer.name], layer.module
        with torch.no_grad():
            ours = lin(x)

        def ref(dt, a=a, b=b, s=scalings[0], p=protos[layer.name], x=x, lin=lin):
            bias = None if lin.bias is None else lin.bias.to(dt)
            return _original_forward(x.to(dt), lin.weight.to(dt), bias, a.to(dt), b.to(dt), s, p.to(dt), 3)

        assert_close_to_reference(ours, ref(torch.float64), ref(torch.float32), torch.float32, layer.name)


def test_layer_scope_needs_equal_shapes_and_scalings(phi3_orig, phi2_orig, tmp_path):
    _, ad3 = phi3_orig
    with pytest.raises(ValueError, match=r"layer 'model.layers.0' has o_proj 64→64, qkv_proj 64→192"):
        LoraLibrary.from_adapters(ad3.task, prototype_scope="layer")
    _, ad2 = phi2_orig
    tasks = []
    for i, p in enumerate(ad2.task):
        d = shutil.copytree(p, tmp_path / f"t{i}")
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["alpha_pattern"] = {"dense": 32}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        tasks.append(d)
    with pytest.raises(ValueError, match="scaling must be the same over the modules of a layer"):
        LoraLibrary.from_adapters(tasks, prototype_scope="layer")
    lib = LoraLibrary.from_adapters(tasks)  # per-module prototypes do not need it
    assert lib.modules["model.layers.0.self_attn.dense"].scaling.tolist() == [8.0] * 4
    with pytest.raises(ValueError, match="prototype_scope must be"):
        LoraLibrary.from_adapters(ad2.task, prototype_scope="block")


def test_variant_arguments_are_checked(phi3_orig, tmp_path):
    _, ad = phi3_orig
    with pytest.raises(ValueError, match="general_weights has 2 entries for 3"):
        LoraLibrary.from_adapters(ad.task, ad.general, general_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="add_weights has 2 entries for 1"):
        LoraLibrary.from_adapters(ad.task, ad.general[:2], add_adapters=ad.general[2:], add_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="given twice \\(as general adapter and as added adapter\\)"):
        LoraLibrary.from_adapters(ad.task, ad.general, add_adapters=ad.general[:1])
    with pytest.raises(ValueError, match="given twice \\(as task adapter and as general adapter\\)"):
        LoraLibrary.from_adapters(ad.task, ad.task[:2])  # only the whole task list is the average-of-tasks variant
    with pytest.raises(ValueError, match="add_adapters are combined after GenKnowSub"):
        LoraLibrary.from_adapters(ad.task, add_adapters=ad.general[:1])
    with pytest.raises(ValueError, match="task_weight must be a finite number"):
        LoraLibrary.from_adapters(ad.task, ad.general, task_weight=float("inf"))
    with pytest.raises(ValueError, match="does not exist"):
        LoraLibrary.from_adapters(ad.task, ad.general, add_adapters=[tmp_path / "missing"])


def test_variant_library_round_trips(phi2_orig, tmp_path):
    _, ad = phi2_orig
    lib = LoraLibrary.from_adapters(ad.task, **_recipe("phi2-cross", ad))
    lib.save(tmp_path / "lib.safetensors")
    back = LoraLibrary.load(tmp_path / "lib.safetensors")
    assert back.prototype_scope == "layer" and back.added_names == ["general_1"]
    assert back.general_names == ["general_0"]
    for p, m in lib.modules.items():
        assert torch.equal(back.modules[p].prototypes, m.prototypes)
