"""patch_model end to end: parity with PEFT's Arrow model, reversibility, placement and bad input."""

import copy
import functools
import warnings

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, patched_layers, reference
from tests.tolerances import FP32_SAME_MATH, assert_matches_peft


def _peft_arrow(setup, k, temp, use_gks):
    from peft import ArrowConfig, create_arrow_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_arrow_model(
            setup.fresh(),
            setup.task,
            ArrowConfig(top_k=k, router_temperature=temp, use_gks=use_gks, rng_seed=0),
            setup.general if use_gks else None,
        ).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("setup_name", ["phi3_setup", "phi2_setup"])
@pytest.mark.parametrize("use_gks", [True, False])
@pytest.mark.parametrize("k, temp", [(1, 1.0), (2, 0.5), (3, 2.0), (5, 1.0)])
def test_matches_peft_arrow(request, setup_name, use_gks, k, temp):
    setup = request.getfixturevalue(setup_name)
    base = _logits(setup.base, setup.ids)
    peft_logits = _logits(_peft_arrow(setup, k, temp, use_gks), setup.ids)
    lib = LoraLibrary.from_adapters(setup.task, setup.general if use_gks else None)
    ours = _logits(gkf.patch_model(setup.fresh(), lib, top_k=k, temperature=temp), setup.ids)
    assert_matches_peft(ours, peft_logits, base, f"{setup_name} gks={use_gks} k={k} T={temp}")


def test_patches_a_peft_arrow_model_in_place(phi3_setup):
    pm = _peft_arrow(phi3_setup, 3, 0.7, True)
    expected = _logits(pm, phi3_setup.ids)
    keys = list(pm.state_dict())
    gkf.patch_model(pm)  # library=None: adapters + ArrowConfig from the PEFT model
    assert list(pm.state_dict()) == keys
    ours = _logits(pm, phi3_setup.ids)
    assert_matches_peft(ours, expected, _logits(phi3_setup.base, phi3_setup.ids), "in place")
    gkf.unpatch_model(pm)
    torch.testing.assert_close(_logits(pm, phi3_setup.ids), expected, rtol=0, atol=0)


def test_state_dict_unchanged_and_unpatch_is_bit_exact(phi3_setup):
    model = phi3_setup.fresh()
    before_keys = list(model.state_dict())
    before = _logits(model, phi3_setup.ids)
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    gkf.patch_model(model, lib)
    assert list(model.state_dict()) == before_keys
    assert len(patched_layers(model)) == len(lib.modules)
    assert not torch.equal(_logits(model, phi3_setup.ids), before)
    gkf.unpatch_model(model)
    assert not gkf.is_patched(model)
    assert torch.equal(_logits(model, phi3_setup.ids), before)
    assert all("forward" not in m.__dict__ for m in model.modules())
    for m, m0 in zip(model.modules(), phi3_setup.base.modules(), strict=True):
        assert m._non_persistent_buffers_set == m0._non_persistent_buffers_set
    assert list(dict(model.named_buffers())) == list(dict(phi3_setup.base.named_buffers()))


def test_double_patch_and_unpatched_unpatch_are_errors(phi3_setup):
    model = phi3_setup.fresh()
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    with pytest.raises(ValueError, match="not patched"):
        gkf.unpatch_model(model)
    gkf.patch_model(model, lib)
    with pytest.raises(ValueError, match="already patched"):
        gkf.patch_model(model, lib)


def test_patched_context_manager_restores_on_error(phi3_setup):
    model = phi3_setup.fresh()
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    with pytest.raises(RuntimeError, match="boom"), gkf.patched(model, lib, top_k=2):
        assert gkf.is_patched(model)
        raise RuntimeError("boom")
    assert not gkf.is_patched(model)


def test_weights_mixing_matches_modular_llm_formula(phi3_setup):
    """mixing="weights": y = W0 x + s (Σ w B)(Σ w A) x per token, checked layer by layer against a direct loop."""
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    model = gkf.patch_model(phi3_setup.fresh(), lib, top_k=3, temperature=0.8, mixing="weights")
    path = "model.layers.1.mlp.down_proj"
    module = dict(model.named_modules())[path]
    x = torch.randn(6, module.in_features)
    m = lib.modules[path]
    with torch.no_grad():
        ours = module(x)
    w, idx = reference.route(x.double(), m.prototypes.double(), 3, 0.8)
    for t in range(6):
        full_w = torch.zeros(lib.num_experts, dtype=torch.float64).index_put_((idx[t],), w[t])
        a_mix = torch.einsum("e,erd->rd", full_w, m.a.double())
        b_mix = torch.einsum("e,eor->or", full_w, m.b.double())
        y = module.weight.double() @ x[t].double() + float(m.scaling[0]) * b_mix @ (a_mix @ x[t].double())
        torch.testing.assert_close(ours[t].double(), y, **FP32_SAME_MATH)


def test_library_matching_nothing_or_wrong_shapes(phi3_setup, phi2_setup):
    lib3 = LoraLibrary.from_adapters(phi3_setup.task)
    with pytest.raises(ValueError, match="built for a Phi3ForCausalLM, not a PhiForCausalLM"):
        gkf.patch_model(phi2_setup.fresh(), lib3)
    lib3.base_model_class = None  # e.g. adapters whose config does not name the model class
    with pytest.raises(ValueError, match="match nothing.*phi models usually target"):
        gkf.patch_model(phi2_setup.fresh(), lib3)
    model = phi3_setup.fresh()
    bad = LoraLibrary.from_adapters(phi3_setup.task)
    path = "model.layers.0.self_attn.o_proj"
    m = bad.modules[path]
    bad.modules[path] = type(m)(m.a[:, :, :-1], m.b, m.scaling, m.prototypes[:, :-1], m.ranks)
    with pytest.raises(ValueError, match="adapters for another base model"):
        gkf.patch_model(model, bad)
    assert not gkf.is_patched(model), "a failed patch must leave the model untouched"


def test_bad_routing_arguments(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    for kwargs, match in (
        ({"top_k": 0}, "top_k"),
        ({"top_k": 6}, "top_k"),
        ({"temperature": 0}, "temperature"),
        ({"backend": "fast"}, "unknown backend"),
        ({"mixing": "mean"}, "mixing"),
    ):
        with pytest.raises(ValueError, match=match):
            gkf.patch_model(phi3_setup.fresh(), lib, **kwargs)
    with pytest.raises(ValueError, match="LoraLibrary"):
        gkf.patch_model(phi3_setup.fresh(), {"not": "a library"})


def test_non_linear_layer_uses_the_delta_only_path(phi3_setup):
    """A target whose forward is x → f(x) but is not a plain nn.Linear (e.g. a quantised layer) gets f(x) + delta."""

    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.0

    model = phi3_setup.fresh()
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    expected = _logits(gkf.patch_model(phi3_setup.fresh(), lib), phi3_setup.ids)
    for name, module in list(model.named_modules()):
        if name.endswith("o_proj"):
            module.__class__ = ScaledLinear
    gkf.patch_model(model, lib)
    assert patched_layers(model)["model.layers.0.self_attn.o_proj"].fused is False
    assert patched_layers(model)["model.layers.0.self_attn.qkv_proj"].fused is True
    torch.testing.assert_close(_logits(model, phi3_setup.ids), expected, **FP32_SAME_MATH)


def test_library_tensors_follow_the_layer_device_and_dtype(phi3_setup):
    """Layers on another device keep their experts there (meta device stands in for a second device)."""
    model = phi3_setup.fresh()
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    layer1 = model.model.layers[1]
    layer1.to("meta")
    layer1.mlp.to(torch.float16)
    gkf.patch_model(model, lib)
    packed = {name: layer.runner.packed for name, layer in patched_layers(model).items()}
    assert packed["model.layers.0.mlp.down_proj"].b_t.device.type == "cpu"
    assert packed["model.layers.1.self_attn.qkv_proj"].a.device.type == "meta"
    assert packed["model.layers.1.mlp.down_proj"].b_t.dtype == torch.float16
    assert packed["model.layers.1.mlp.down_proj"].prototypes.dtype == torch.float32
    assert packed["model.layers.1.self_attn.qkv_proj"].b_t.dtype == torch.float32


def test_accelerate_hook_stays_in_front(phi3_setup):
    """With an accelerate hook (device_map / offload), the patched forward sits under the hook's _old_forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    calls = []

    class CountingHook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    model = phi3_setup.fresh()
    target = model.model.layers[0].self_attn.o_proj
    add_hook_to_module(target, CountingHook())
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    expected = _logits(gkf.patch_model(phi3_setup.fresh(), lib), phi3_setup.ids)
    gkf.patch_model(model, lib)
    assert patched_layers(model)["model.layers.0.self_attn.o_proj"].module is target
    hook_forward = target.__dict__["forward"]
    assert isinstance(hook_forward, functools.partial), "accelerate's hooked forward stays in front"
    assert getattr(target._old_forward, "__func__", None) is not type(target).forward, "the patched forward is under it"
    torch.testing.assert_close(_logits(model, phi3_setup.ids), expected, rtol=0, atol=0)
    assert calls, "the hook must still run"
    gkf.unpatch_model(model)
    assert target._old_forward.__func__ is type(target).forward
    remove_hook_from_module(target)
    assert target.forward.__func__ is type(target).forward


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_patched_layer_matches_reference(phi3_setup, dtype):
    """A half-precision model gets half-precision experts; the patched layer's delta (alone, so the base output's
    magnitude does not loosen the bound) and its whole output meet the tolerance table.

    Inputs are built with a clear top-k margin (whole random models flip near-tied routings in bf16, as PEFT does).
    The same check refuses a delta in which one selected expert's B is 10 % off: it can fail.
    """
    from tests.tolerances import assert_close_to_reference

    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    model = gkf.patch_model(copy.deepcopy(phi3_setup.base).to(dtype), lib, top_k=2, temperature=0.5)
    path = "model.layers.1.self_attn.o_proj"
    layer = dict(model.named_modules())[path]
    runner = patched_layers(model)[path].runner
    packed = runner.packed
    assert packed.b_t.dtype == dtype and packed.a.dtype == dtype and packed.prototypes.dtype == torch.float32
    m = lib.modules[path]
    p64 = m.prototypes.double()
    coef = torch.linspace(3.0, 1.0, lib.num_experts, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x64 = torch.stack([coef[torch.randperm(lib.num_experts, generator=g)] for _ in range(9)]) @ p64
    x64 = x64.to(dtype).double()  # representable in the low dtype
    w0 = layer.weight.double()

    def ref(dt, base=True, b=m.b):
        c = {"a": m.a.to(dt), "b": b.to(dt), "prototypes": m.prototypes.to(dt)}
        return reference.routed_lora(
            x64.to(dt), c["a"], c["b"], m.scaling.to(dt), c["prototypes"], 2, 0.5, weight=w0.to(dt) if base else None
        )

    with torch.no_grad():
        delta = runner(x64.to(dtype))  # what the patched layer adds to x Wᵀ, alone
        whole = layer(x64.to(dtype))
    assert_close_to_reference(delta, ref(torch.float64, False), ref(dtype, False), dtype, f"{dtype} o_proj delta")
    assert_close_to_reference(whole, ref(torch.float64), ref(dtype), dtype, f"{dtype} o_proj")
    # A kernel that read one selected expert's B 10 % off would be refused by the same check.
    top = int(reference.route(x64, p64, 2, 0.5)[1][0, 0])  # an expert the first token uses
    wrong_b = m.b.double().clone()
    wrong_b[top] *= 1.1
    mutant = delta.double() + (ref(torch.float64, False, wrong_b) - ref(torch.float64, False))
    with pytest.raises(AssertionError):
        assert_close_to_reference(mutant, ref(torch.float64, False), ref(dtype, False), dtype, "mutant")


def test_cpu_kernel_and_torch_regimes_agree_and_autograd_flows(phi3_setup, monkeypatch):
    """A CPU fp32 model runs the compiled kernel; the torch regimes (what runs with autograd) give the same logits,
    and gradients flow through them."""
    from genknowsub_fast.backends import cpu_kernel
    from tests.extension_required import require_op

    require_op("routed_lora_delta_")
    model = phi3_setup.fresh()
    gkf.patch_model(model, LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general), top_k=2)
    assert all(layer.runner.active_backend == "cpu" for layer in patched_layers(model).values())
    hot = _logits(model, phi3_setup.ids)
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "takes", lambda x, y: False)
        slow = _logits(model, phi3_setup.ids)
    torch.testing.assert_close(hot, slow, **FP32_SAME_MATH)
    emb = model.get_input_embeddings()(phi3_setup.ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb).logits
    torch.testing.assert_close(out.detach(), hot, **FP32_SAME_MATH)
    out.sum().backward()
    assert emb.grad is not None and bool(emb.grad.abs().sum() > 0)


# ------------------------------------------------------------------------------------------- patching faults
def test_concurrent_patch_and_unpatch_are_atomic(phi3_setup, monkeypatch):
    """two threads patching one model both succeeded (each passed the "already patched" test before the
    other wrote), and after one unpatch the model's forward raised KeyError. Each packing step here sleeps 20 ms, so
    without the lock both threads are certain to pass that test together; with it the second waits and is refused."""
    import threading
    import time

    from genknowsub_fast.runner import RoutedLinear

    lib = LoraLibrary.from_adapters(phi3_setup.task)
    model = phi3_setup.fresh()
    base = _logits(model, phi3_setup.ids)
    prepare = RoutedLinear.prepare

    def slow_prepare(self, *args, **kwargs):
        time.sleep(0.02)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(RoutedLinear, "prepare", slow_prepare)
    start = threading.Barrier(2)
    results = []

    def run(fn, *args):
        start.wait()
        try:
            fn(model, *args)
            results.append("ok")
        except ValueError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=run, args=(gkf.patch_model, lib)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[1:] == ["ok"] and "already patched" in sorted(results)[0], results
    patched_logits = _logits(model, phi3_setup.ids)
    expected = _logits(gkf.patch_model(phi3_setup.fresh(), lib), phi3_setup.ids)
    torch.testing.assert_close(patched_logits, expected, rtol=0, atol=0)

    results.clear()
    threads = [threading.Thread(target=run, args=(gkf.unpatch_model,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[1:] == ["ok"] and "not patched" in sorted(results)[0], results
    assert not gkf.is_patched(model)
    assert torch.equal(_logits(model, phi3_setup.ids), base)


def test_default_top_k_fits_a_small_library(phi3_setup):
    """with two experts and no top_k given, patching raised about `top_k=3`, never passed by the user;
    the default is min(3, E) when the library carries none."""
    lib = LoraLibrary.from_adapters(phi3_setup.task[:2])
    model = gkf.patch_model(phi3_setup.fresh(), lib)
    assert {layer.top_k for layer in patched_layers(model).values()} == {2}


def test_routing_argument_types(phi3_setup):
    """a numpy integer top_k was refused while temperature=True was accepted (as 1.0)."""
    import numpy as np

    lib = LoraLibrary.from_adapters(phi3_setup.task)
    model = gkf.patch_model(phi3_setup.fresh(), lib, top_k=np.int64(2), temperature=np.float32(0.5))
    layer = next(iter(patched_layers(model).values()))
    assert type(layer.top_k) is int and layer.top_k == 2 and type(layer.temperature) is float
    for kwargs in ({"temperature": True}, {"top_k": True}, {"top_k": 2.0}, {"temperature": float("inf")}):
        with pytest.raises(ValueError, match="top_k|temperature"):
            gkf.patch_model(phi3_setup.fresh(), lib, **kwargs)


def test_patch_model_refuses_none_and_matches_modules_before_routing_args(phi3_setup, phi2_setup):
    """patch_model(None) raised AttributeError, and a library matching nothing in the model was reported
    as a bad top_k when top_k was also out of range (the top_k check ran before the module match)."""
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        gkf.patch_model(None, lib)
    lib.base_model_class = None
    with pytest.raises(ValueError, match="match nothing"):
        gkf.patch_model(phi2_setup.fresh(), lib, top_k=99)


def test_unpatching_inside_patched_block(phi3_setup):
    """unpatching inside `patched()` made the block's exit raise "not patched"."""
    model = phi3_setup.fresh()
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    with gkf.patched(model, lib, top_k=2):
        gkf.unpatch_model(model)
    assert not gkf.is_patched(model)


def test_patched_model_pickles(phi3_setup):
    """torch.save(patched_model) failed on a pybind object. The instance forward is a picklable object
    and the runner drops its packed plan when pickled; the loaded model computes the same logits and unpatches."""
    import io

    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    model = gkf.patch_model(phi3_setup.fresh(), lib, top_k=2)
    expected = _logits(model, phi3_setup.ids)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert gkf.is_patched(loaded)
    assert all(layer.runner.packed is None for layer in patched_layers(loaded).values()), "plans are not pickled"
    torch.testing.assert_close(_logits(loaded, phi3_setup.ids), expected, rtol=0, atol=0)
    gkf.unpatch_model(loaded)
    base = _logits(phi3_setup.base, phi3_setup.ids)
    torch.testing.assert_close(_logits(loaded, phi3_setup.ids), base, rtol=0, atol=0)


def test_a_saved_library_path_patches_as_the_loaded_library(phi3_setup, tmp_path):
    """patch_model takes the path of a saved library, as make_llm and the eval command do."""
    lib = gkf.LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    lib.save(tmp_path / "lib.safetensors")
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = gkf.patch_model(phi3_setup.fresh(), lib, top_k=2)(ids).logits
        got = gkf.patch_model(phi3_setup.fresh(), str(tmp_path / "lib.safetensors"), top_k=2)(ids).logits
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="does not exist"):
        gkf.patch_model(phi3_setup.fresh(), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="must be a LoraLibrary or the path of a saved one, got dict"):
        gkf.patch_model(phi3_setup.fresh(), {})
