"""PEFT's own Arrow tests (huggingface/peft tests/test_arrow.py), ported: every forward case and error case, on
config-built models (no hub), each compared with PEFT's real output; plus adapters whose power iteration does not
converge.

"PEFT's real output" is the PEFT model's own logits on the same input. Where PEFT's lazy steps have already run, the
patched model is checked against them and, after unpatching, PEFT must give the same logits bit for bit (patching
leaves PEFT's state as PEFT's next forward would). Where the point is a PEFT state *before* its lazy steps (experts
loaded late, ``rng_seed=None``), the model is patched in that state and compared with an identical PEFT model that
ran normally. The adapters are seeded explicitly (PEFT's test draws them from the global generator).
"""

from __future__ import annotations

import copy
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

# PEFT is a test dependency: without it this suite fails to import instead of skipping (it is the main parity check).
from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model  # noqa: E402

import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, reference
from genknowsub_fast.integrations.peft import arrow_layers, arrow_router
from tests.tolerances import (
    NONCONVERGED_MIN_EFFECT_GAP,
    PROTOTYPE_COS_REPORTED,
    PROTOTYPE_MIN_COS,
    assert_close_to_reference,
    assert_matches_peft,
    max_err,
)

PEFT_WARNING = "PEFT's Arrow prototypes"
pytestmark = pytest.mark.filterwarnings(f"ignore:{PEFT_WARNING}", "ignore:fan_in_fan_out", "ignore::FutureWarning")


def gpt2_tiny():
    """``tiny-random-gpt2`` as PEFT's test uses it, rebuilt from a config: n_embd 32, so c_attn is 32→96."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1000, n_embd=32, n_layer=5, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


def save_adapter(base, path, seed, rank=4, targets=("c_attn",)):
    """PEFT's ``_create_and_save_adapter``: LoRA on c_attn with ``init_lora_weights=False``, seeded."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, target_modules=list(targets), fan_in_fan_out=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    base = gpt2_tiny()
    d = tmp_path_factory.mktemp("peft_arrow")
    ts = [save_adapter(base, d / f"ts{i}", seed=10 + i) for i in range(3)]
    gen = [save_adapter(base, d / f"gen{i}", seed=20 + i) for i in range(2)]
    x = torch.ones(1, 4, dtype=torch.long)
    return SimpleNamespace(base=base, dir=d, ts=ts, gen=gen, x=x, base_logits=logits(base, x))


def arrow(base, ts, gen=None, dtype=None, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"autocast_adapter_dtype": False, "dtype": dtype} if dtype is not None else {}
        return create_arrow_model(copy.deepcopy(base), ts, ArrowConfig(**cfg), general_adapter_paths=gen, **kwargs)


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def patched_logits(model, x, **patch_kwargs):
    """Patch, run, unpatch; returns the patched logits."""
    gkf.patch_model(model, **patch_kwargs)
    try:
        return logits(model, x)
    finally:
        gkf.unpatch_model(model)


def check_against_peft(model, x, base_logits, **patch_kwargs):
    """PEFT's output, then patched, then unpatched (bit-equal to PEFT's); plus a float64 run of PEFT's maths."""
    y_peft = logits(model, x)
    y64 = logits(copy.deepcopy(model).double(), x)  # PEFT's prototypes and routing, in float64
    y_ours = patched_logits(model, x, **patch_kwargs)
    assert torch.equal(logits(model, x), y_peft), "unpatching must leave PEFT's state as it was"
    assert_matches_peft(y_ours, y_peft, base_logits)
    assert_close_to_reference(y_ours, y64, y_peft, torch.float32, "patched vs float64 PEFT")
    return y_peft, y_ours


# --------------------------------------------------------------------------------------------------- error cases
def test_incompatible_rank_raises(gpt2):
    """PEFT: rank 4 and rank 8 experts are refused. Ours: refused with GenKnowSub (factor-wise subtraction needs one
    rank); without it mixed ranks are a documented superset, checked against the float64 reference."""
    r8 = save_adapter(gpt2.base, gpt2.dir / "r8", seed=30, rank=8)
    with pytest.raises(ValueError, match="rank mismatch"):
        arrow(gpt2.base, [gpt2.ts[0], r8], top_k=1)
    with pytest.raises(ValueError, match="all ranks must agree"):
        LoraLibrary.from_adapters([gpt2.ts[0], r8], general_adapters=gpt2.gen[:1], gks="param")
    lib = LoraLibrary.from_adapters([gpt2.ts[0], r8])
    assert lib.modules["transformer.h.0.attn.c_attn"].ranks.tolist() == [4, 8]
    model = gkf.patch_model(copy.deepcopy(gpt2.base), lib, top_k=1)
    conv = model.transformer.h[0].attn.c_attn
    m = lib.modules["transformer.h.0.attn.c_attn"]
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = conv(x)

    def ref(dt):
        return reference.routed_lora(
            x.to(dt), m.a.to(dt), m.b.to(dt), m.scaling.to(dt), m.prototypes.to(dt), 1, 1.0,
            weight=conv.weight.t().to(dt), bias=conv.bias.to(dt),
        )  # fmt: skip

    assert_close_to_reference(ours, ref(torch.float64), ref(torch.float32), torch.float32, "mixed ranks")
    svd = reference.prototypes_svd(m.a.double(), m.b.double())
    assert float((m.prototypes.double() * svd).sum(1).abs().min()) >= PROTOTYPE_MIN_COS


def test_gks_without_general_adapters_raises(gpt2):
    with pytest.raises(ValueError, match="provide general LoRA paths"):
        arrow(gpt2.base, gpt2.ts, top_k=2, use_gks=True)
    for gks in ("param", "delta"):
        with pytest.raises(ValueError, match="no general adapters were given"):
            LoraLibrary.from_adapters(gpt2.ts, general_adapters=[], gks=gks)
    with pytest.raises(ValueError, match="gks=None"):
        LoraLibrary.from_adapters(gpt2.ts, general_adapters=gpt2.gen, gks=None)
    assert LoraLibrary.from_adapters(gpt2.ts).gks is None
    assert LoraLibrary.from_adapters(gpt2.ts, gpt2.gen).gks == "param"


def test_not_an_adapter_directory():
    """PEFT's ``_resolve_adapter_source`` cases parse hub ids; ours reads local directories only."""
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        LoraLibrary.from_adapters(["not/a/dir"])


def test_conv2d_and_embedding_targets(gpt2, tmp_path):
    """PEFT refuses Conv2d targets (TypeError) and fails on an embedding-only adapter (an unhelpful TypeError); ours
    names the module and its kind. An adapter on c_attn and wte is accepted by PEFT, whose router ignores the
    embedding part: reading it from files is refused, patching the PEFT model reproduces PEFT and says so."""
    from transformers import ResNetConfig, ResNetForImageClassification

    rcfg = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(rcfg).eval()
    torch.manual_seed(1)
    get_peft_model(copy.deepcopy(resnet), LoraConfig(r=4, target_modules=["convolution"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "cv0")  # fmt: skip
    with pytest.raises(TypeError, match="LoRA adapters must only target Linear"):
        create_arrow_model(copy.deepcopy(resnet), [str(tmp_path / "cv0")], ArrowConfig(top_k=1))
    with pytest.raises(ValueError, match=r"'resnet\.embedder\.embedder\.convolution' is a Conv2d \(convolution\)"):
        LoraLibrary.from_adapters([tmp_path / "cv0"])

    wte = save_adapter(gpt2.base, tmp_path / "wte", seed=31, targets=("wte",))
    with pytest.raises(TypeError):
        arrow(gpt2.base, [wte], top_k=1)
    with pytest.raises(ValueError, match="'transformer.wte' is an embedding LoRA"):
        LoraLibrary.from_adapters([wte])

    mixed = [save_adapter(gpt2.base, tmp_path / f"mixed{i}", seed=40 + i, targets=("c_attn", "wte")) for i in range(3)]
    with pytest.raises(ValueError, match="embedding LoRA"):
        LoraLibrary.from_adapters(mixed)
    m = arrow(gpt2.base, mixed, top_k=2, rng_seed=0)
    with pytest.warns(UserWarning, match=r"transformer\.wte \(Embedding\).*inactive under the router"):
        check_against_peft(m, gpt2.x, gpt2.base_logits)


# ------------------------------------------------------------------------------------------------- forward cases
@pytest.mark.parametrize("top_k", [2, 1])
def test_arrow_differs_with_extra_expert(gpt2, top_k):
    """Arrow over 2 and over 3 experts, ``rng_seed=None`` (PEFT's start vectors come from the global generator):
    patched before PEFT's first forward, with the global generator in the same state, ours equals PEFT for both."""
    out = {}
    for n in (2, 3):
        twin = arrow(gpt2.base, gpt2.ts[:n], top_k=top_k)
        torch.manual_seed(123)
        y_peft = logits(twin, gpt2.x)
        model = arrow(gpt2.base, gpt2.ts[:n], top_k=top_k)
        torch.manual_seed(123)
        gkf.patch_model(model)  # draws PEFT's start vectors as PEFT's first forward would
        y_ours = logits(model, gpt2.x)
        gkf.unpatch_model(model)
        assert torch.equal(logits(model, gpt2.x), y_peft), "PEFT's prototypes must be those of its own first forward"
        assert_matches_peft(y_ours, y_peft, gpt2.base_logits, f"{n} experts")
        out[n] = y_ours
    assert max_err(out[2], out[3]) > 1e-3


@pytest.mark.parametrize("n_general", [1, 2])
def test_late_load_with_forward_applies_pending_gks(gpt2, n_general):
    """An expert loaded after PEFT's first forward is subtracted at PEFT's next router forward (pending GKS).
    Patched in that pending state, ours equals the all-at-once model; patching while the new expert is active is
    refused with a message naming set_adapter."""
    gen = gpt2.gen[:n_general]
    big = arrow(gpt2.base, gpt2.ts, gen, top_k=2, use_gks=True, rng_seed=42)
    y_big = logits(big, gpt2.x)

    def small_then_load():
        m = arrow(gpt2.base, gpt2.ts[:2], gen, top_k=2, use_gks=True, rng_seed=42)
        logits(m, gpt2.x)
        m.load_adapter(gpt2.ts[2], adapter_name="new_added_ts_expert")
        m.set_adapter("new_added_ts_expert")
        logits(m, torch.ones(3, 5, dtype=torch.long))
        return m

    model, twin = small_then_load(), small_then_load()
    with pytest.raises(ValueError, match=re.escape('set_adapter("arrow_router")')):
        gkf.patch_model(model)
    assert not gkf.is_patched(model)
    model.set_adapter("arrow_router")
    twin.set_adapter("arrow_router")
    router = arrow_router(arrow_layers(model)[0][1])
    assert router.gks_added_adapter_names == ["new_added_ts_expert"] and not router._protos_ready
    y_ours = patched_logits(model, gpt2.x)
    assert_matches_peft(y_ours, y_big, gpt2.base_logits, "pending GKS")
    y_twin = logits(twin, gpt2.x)
    assert torch.allclose(y_twin, y_big), "PEFT's own test: the late expert equals loading all at once"
    assert torch.equal(logits(model, gpt2.x), y_twin), "patching must leave PEFT's state as PEFT's forward would"


def test_late_load_activate_new_is_refused(gpt2):
    big = arrow(gpt2.base, gpt2.ts, gpt2.gen[:1], top_k=2, use_gks=True, rng_seed=42)
    model = arrow(gpt2.base, gpt2.ts[:2], gpt2.gen[:1], top_k=2, use_gks=True, rng_seed=42)
    logits(model, gpt2.x)
    model.load_adapter(gpt2.ts[2], adapter_name="new_added_ts_expert")
    model.set_adapter("new_added_ts_expert")
    assert not torch.allclose(logits(model, gpt2.x), logits(big, gpt2.x)), "PEFT runs plain LoRA here"
    with pytest.raises(ValueError, match=re.escape("active adapters are ['new_added_ts_expert']")):
        gkf.patch_model(model)


def test_late_load_without_forward(gpt2):
    """Loaded before any forward: PEFT's GenKnowSub covers every task, the late one included."""
    big = arrow(gpt2.base, gpt2.ts, gpt2.gen[:1], top_k=2, use_gks=True, rng_seed=42)
    y_big = logits(big, gpt2.x)
    model = arrow(gpt2.base, gpt2.ts[:2], gpt2.gen[:1], top_k=2, use_gks=True, rng_seed=42)
    model.load_adapter(gpt2.ts[2], adapter_name="new_added_ts_expert")
    y_ours = patched_logits(model, gpt2.x)
    assert_matches_peft(y_ours, y_big, gpt2.base_logits, "late load, no forward")
    assert torch.allclose(logits(model, gpt2.x), y_big)


@pytest.mark.parametrize("top_k", [2, 1])
def test_genknowsub_changes_output(gpt2, top_k):
    torch.manual_seed(5)
    plain = check_against_peft(arrow(gpt2.base, gpt2.ts, top_k=top_k), gpt2.x, gpt2.base_logits)[1]
    torch.manual_seed(5)
    with_gks = check_against_peft(
        arrow(gpt2.base, gpt2.ts, gpt2.gen[:1], top_k=top_k, use_gks=True), gpt2.x, gpt2.base_logits
    )[1]
    assert max_err(plain, with_gks) > 1e-3


def test_merging_is_refused_while_patched(gpt2):
    model = arrow(gpt2.base, gpt2.ts[:2], top_k=2, rng_seed=0)
    with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
        model.merge_and_unload()
    y_peft = logits(model, gpt2.x)
    gkf.patch_model(model)
    with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
        model.merge_and_unload()
    gkf.unpatch_model(model)
    assert torch.equal(logits(model, gpt2.x), y_peft)


def test_float16_without_autocast(gpt2):
    """fp16 base and fp16 adapters (``autocast_adapter_dtype=False``): PEFT routes with fp16 scores, ours with float32
    scores. On these inputs both choose the same experts (checked on PEFT's own per-layer inputs), and ours is as
    close to a float64 run of PEFT's maths as PEFT itself (the tolerance table's fp16 rule)."""
    base16 = copy.deepcopy(gpt2.base).half()
    model = arrow(base16, gpt2.ts, top_k=2, rng_seed=0, dtype=torch.float16)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = []
    for _, mod in arrow_layers(model):
        mod.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
    for x, kwargs in ((gpt2.x, {"attention_mask": torch.ones(1, 4, dtype=torch.long)}), (ids, {})):
        inputs.clear()
        y_peft = logits(model, x, **kwargs)
        for mod, xin in inputs:
            p16 = arrow_router(mod).prototypes
            assert p16.dtype == torch.float16
            x16 = xin.reshape(-1, xin.shape[-1]).half()
            sel16 = (x16 @ p16.T).abs().topk(2).indices.sort().values
            sel32 = (x16.float() @ p16.float().T).abs().topk(2).indices.sort().values
            assert torch.equal(sel16, sel32), "precondition: fp16 and fp32 scores choose the same experts here"
        y64 = logits(copy.deepcopy(model).double(), x, **kwargs)
        inputs.clear()
        gkf.patch_model(model)
        y_ours = logits(model, x, **kwargs)
        with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
            model.merge_adapter(safe_merge=False)
        with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
            model.merge_and_unload()
        gkf.unpatch_model(model)
        assert y_ours.dtype == torch.float16
        assert_close_to_reference(y_ours, y64, y_peft, torch.float16, "fp16 patched vs float64 PEFT")


def test_prototypes_not_recomputed_on_repeated_forward(gpt2, monkeypatch):
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from genknowsub_fast.backends import prototype_ext, torch_prototypes

    calls = {"peft": 0, "ours": 0}

    def counting(owner, name, key):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counting(ArrowLoraLinearLayer, "top_right_singular_vec_from_BA", "peft")
    model = arrow(gpt2.base, gpt2.ts, top_k=2, rng_seed=0)
    logits(model, gpt2.x)
    assert calls["peft"] == 3 * len(arrow_layers(model)), "PEFT computes E prototypes per layer on its first forward"
    for owner, name in ((prototype_ext, "exact_prototypes_batched"), (torch_prototypes, "exact_prototypes"),
                        (torch_prototypes, "power_prototypes")):  # fmt: skip
        counting(owner, name, "ours")
    gkf.patch_model(model)
    calls.update(peft=0, ours=0)
    first, second = logits(model, gpt2.x), logits(model, gpt2.x)
    assert calls == {"peft": 0, "ours": 0}
    assert torch.equal(first, second)


def test_training_with_a_task_adapter(gpt2):
    """PEFT trains a task adapter after ``set_adapter("task_0")``. Patching in that state is refused; a model
    patched while the router was active runs PEFT's own forward once the adapter changes, so training matches PEFT."""
    model = arrow(gpt2.base, gpt2.ts[:2], top_k=2, rng_seed=0)
    model.train()
    model.set_adapter("task_0")
    with pytest.raises(ValueError, match=re.escape('set_adapter("arrow_router")')):
        gkf.patch_model(model)

    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for patch in (True, False):
        m = arrow(gpt2.base, gpt2.ts[:2], top_k=2, rng_seed=0).eval()
        logits(m, gpt2.x)
        if patch:
            gkf.patch_model(m)
        m.train()
        m.set_adapter("task_0")
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        before = m.base_model.model.transformer.h[0].attn.c_attn.lora_A["task_0"].weight.detach().clone()
        torch.manual_seed(7)  # the same dropout masks in both runs
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        after = m.base_model.model.transformer.h[0].attn.c_attn.lora_A["task_0"].weight.detach()
        assert not torch.equal(before, after)
        results.append((loss.detach(), after.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_patched_model_follows_peft_adapter_switches(gpt2):
    """After patching, ``disable_adapter()`` and ``set_adapter("task_1")`` run PEFT's own forward (bit for bit as an
    unpatched twin); back on the router the layers are routed again."""
    model, twin = (arrow(gpt2.base, gpt2.ts, top_k=2, rng_seed=0) for _ in range(2))
    logits(twin, gpt2.x)
    gkf.patch_model(model)
    routed = logits(model, gpt2.x)
    with model.disable_adapter(), twin.disable_adapter():
        assert torch.equal(logits(model, gpt2.x), logits(twin, gpt2.x))
    model.set_adapter("task_1")
    twin.set_adapter("task_1")
    assert torch.equal(logits(model, gpt2.x), logits(twin, gpt2.x))
    model.set_adapter("arrow_router")
    assert torch.equal(logits(model, gpt2.x), routed)


# ------------------------------------------------------------------------------------ non-converging adapters
@pytest.fixture(scope="module", params=[0.97, 0.99], ids=lambda r: f"ratio{r}")
def nonconvergent(request, gpt2, tmp_path_factory):
    """Task adapters whose subtracted ΔW have σ2/σ1 = 0.97 / 0.99 (``synthetic.nonconvergent_spectrum``), one
    general adapter, and the PEFT model's own output on them."""
    from genknowsub_fast.synthetic import nonconvergent_spectrum, write_adapters

    out = tmp_path_factory.mktemp(f"nonconv{request.param}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(
            gpt2.base, out, 3, 1, rank=4, target_modules=("c_attn",), spectrum=nonconvergent_spectrum(request.param)
        )
    x = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = arrow(gpt2.base, ad.task, ad.general, top_k=2, use_gks=True, rng_seed=42)
    y_peft = logits(model, x)
    return SimpleNamespace(ad=ad, x=x, model=model, y_peft=y_peft, base_logits=logits(gpt2.base, x))


def peft_min_cos(model) -> float:
    """min |cos| between PEFT's prototypes and the float64 SVD of its (subtracted) experts, zero ΔW excluded."""
    worst = 1.0
    for _, mod in arrow_layers(model):
        router = arrow_router(mod)
        a = torch.stack([mod.lora_A[n].weight for n in router.task_adapter_names]).double()
        b = torch.stack([mod.lora_B[n].weight for n in router.task_adapter_names]).double()
        exact = reference.prototypes_svd(a, b)
        p = router.prototypes.double()
        cos = (exact * p).sum(1).abs() / (p.norm(dim=1) * exact.norm(dim=1))
        worst = min(worst, float(cos.min()))
    return worst


def test_nonconvergent_default_reproduces_peft_and_warns_once(nonconvergent):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y_ours = patched_logits(nonconvergent.model, nonconvergent.x)
    assert_matches_peft(y_ours, nonconvergent.y_peft, nonconvergent.base_logits, "non-converged, default")
    assert torch.equal(logits(nonconvergent.model, nonconvergent.x), nonconvergent.y_peft)
    ours = [w for w in caught if PEFT_WARNING in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    reported = float(re.search(r"min \|cos\| ([0-9.]+)", str(ours[0].message)).group(1))
    measured = peft_min_cos(nonconvergent.model)
    assert measured < 0.9, "precondition: PEFT's 15 steps have not converged on these adapters"
    assert abs(reported - measured) <= PROTOTYPE_COS_REPORTED
    assert 'prototypes="exact"' in str(ours[0].message)


def test_nonconvergent_exact_prototypes_differ_from_peft(nonconvergent):
    """Exact Arrow on the same experts moves the output by more than 0.3 of the adapters' effect: which is why the
    default reproduces PEFT, and exact Arrow is asked for by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence warning when exact prototypes are asked for
        y_exact = patched_logits(nonconvergent.model, nonconvergent.x, prototypes="exact")
    effect = (nonconvergent.y_peft - nonconvergent.base_logits).norm()
    gap = float((y_exact - nonconvergent.y_peft).norm() / effect)
    assert gap > NONCONVERGED_MIN_EFFECT_GAP, f"exact vs PEFT: {gap:.3f} of the effect"
    lib = LoraLibrary.from_peft_model(nonconvergent.model, prototypes="exact")
    for m in lib.modules.values():
        svd = reference.prototypes_svd(m.a.double(), m.b.double())
        assert float((m.prototypes.double() * svd).sum(1).abs().min()) >= PROTOTYPE_MIN_COS


def test_no_warning_on_converging_adapters(gpt2, tmp_path):
    """Adapters whose subtracted ΔW decay by 0.5 per singular value (σ2/σ1 = 0.5): PEFT's prototypes are exact to
    float32 rounding, so no warning."""
    from genknowsub_fast.synthetic import write_adapters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(gpt2.base, tmp_path, 3, 1, rank=4, target_modules=("c_attn",), decay=0.5)
    model = arrow(gpt2.base, ad.task, ad.general, top_k=2, use_gks=True, rng_seed=42)
    x = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        check_against_peft(model, x, logits(gpt2.base, x))
    assert peft_min_cos(model) > 0.999


def test_power_library_from_files_is_pefts_bit_for_bit(gpt2):
    """A library built from the adapter directories with PEFT's power iteration and seed holds PEFT's subtracted
    factors and prototypes bit for bit (GenKnowSub's default mean is computed as PEFT computes it)."""
    model = arrow(gpt2.base, gpt2.ts, gpt2.gen, top_k=2, use_gks=True, rng_seed=42)
    y_peft = logits(model, gpt2.x)
    lib = LoraLibrary.from_adapters(gpt2.ts, gpt2.gen, prototypes="power", rng_seed=42)
    for name, mod in arrow_layers(model):
        m = lib.modules[name.removeprefix("base_model.model.")]
        router = arrow_router(mod)
        assert torch.equal(m.prototypes, router.prototypes)
        for i, n in enumerate(router.task_adapter_names):
            assert torch.equal(m.a[i], mod.lora_A[n].weight) and torch.equal(m.b[i], mod.lora_B[n].weight)
    y_ours = logits(gkf.patch_model(copy.deepcopy(gpt2.base), lib, top_k=2), gpt2.x)
    assert_matches_peft(y_ours, y_peft, gpt2.base_logits, "power library from files")


def test_other_peft_layouts_are_named(gpt2, monkeypatch):
    """If PEFT's Arrow router lacks what is read from it, the error names the installed PEFT version."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from genknowsub_fast.integrations.peft import peft_version

    model = arrow(gpt2.base, gpt2.ts, top_k=2, rng_seed=0)
    with monkeypatch.context() as m:
        m.delattr(ArrowLoraLinearLayer, "gen_know_sub")
        with pytest.raises(ValueError, match=re.escape(f"PEFT {peft_version()}")):
            gkf.patch_model(model)
    with monkeypatch.context() as m:
        m.setattr(ArrowLoraLinearLayer, "build_prototypes", lambda self, a, b: None)
        with pytest.raises(ValueError, match="no prototypes buffer"):
            LoraLibrary.from_peft_model(model)
    assert not gkf.is_patched(model)
    with pytest.raises(ValueError, match="prototypes must be one of"):
        LoraLibrary.from_peft_model(model, prototypes="power")
    with pytest.raises(ValueError, match="prototypes= chooses the prototypes of a PEFT Arrow model"):
        gkf.patch_model(copy.deepcopy(gpt2.base), LoraLibrary.from_adapters(gpt2.ts), prototypes="exact")
    with pytest.raises(ValueError, match="library is None"):
        gkf.patch_model(copy.deepcopy(gpt2.base))
