"""A bitsandbytes 4-bit NF4 base on the CPU: patched layers against a float64 reference on the dequantised weights,
and PEFT's Arrow on the same 4-bit model against ours.

The original GenKnowSub code loads Phi-3 with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=False)``; PEFT's 4-bit Arrow test uses bf16 compute.
A 4-bit layer computes ``x · dequantize_4bit(W)ᵀ`` in its compute dtype (bit for bit on CPU, checked below), so the
reference of a patched layer is the float64 routed LoRA on top of the dequantised weight.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, patched_layers, reference
from tests.tolerances import assert_close_to_reference

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed (it is in the [test] extra: pip install -e '.[test]')"
)
from bitsandbytes.functional import dequantize_4bit  # noqa: E402
from bitsandbytes.nn import Linear4bit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def load_4bit(path, compute_dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=compute_dtype, quantization_config=quant, device_map="cpu"
        )
    return model.eval()


def dequantised(model) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's dequantised weight, by module name (read before any forward)."""
    return {
        n: dequantize_4bit(m.weight.data, m.weight.quant_state)
        for n, m in model.named_modules()
        if isinstance(m, Linear4bit)
    }


def float64_copy(base, model4, deq):
    """``base`` in float64 with the 4-bit model's weights: dequantised 4-bit weights, the other (unquantised)
    parameters as the 4-bit model holds them."""
    out = copy.deepcopy(base).double()
    for name, p in out.named_parameters():
        module, _, leaf = name.rpartition(".")
        with torch.no_grad():
            if module in deq and leaf == "weight":
                p.copy_(deq[module].double())
            else:
                p.copy_(model4.get_parameter(name).double())
    return out


@pytest.fixture(scope="module")
def saved_phi3(phi3_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3_fp32")
    phi3_setup.base.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "compute_dtype, mixing, top_k",
    [(torch.float16, "weights", 3), (torch.bfloat16, "output", 2)],
    ids=["original-fp16-weights", "peft-bf16-output"],
)
def test_patched_4bit_layers_match_dequantised_reference(phi3_setup, saved_phi3, compute_dtype, mixing, top_k):
    model = load_4bit(saved_phi3, compute_dtype)
    deq = dequantised(model)
    assert len(deq) == 8, "every Phi-3 projection is a 4-bit layer"
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    gkf.patch_model(model, lib, top_k=top_k, mixing=mixing)
    layers = patched_layers(model)
    inputs = {}
    for layer in layers.values():
        assert not layer.fused and layer.runner.packed.a.dtype == torch.float32  # PEFT's and the original's
        layer.recorder = lambda lay, x: inputs.setdefault(lay.name, x.detach().clone())
    with torch.no_grad():
        model(phi3_setup.ids)
    assert set(inputs) == set(lib.modules)
    for name, layer in layers.items():
        layer.recorder = None
        x = inputs[layer.name].reshape(-1, inputs[layer.name].shape[-1])
        w = deq[name]
        m = lib.modules[layer.name]
        with torch.no_grad():
            ours = layer.module(x)

        def ref(dt, m=m, x=x, w=w):
            return reference.routed_lora(
                x.to(dt), m.a.to(dt), m.b.to(dt), m.scaling.to(dt), m.prototypes.to(dt), top_k, 1.0, mixing,
                weight=w.to(dt),
            )  # fmt: skip

        assert_close_to_reference(ours, ref(torch.float64), ref(compute_dtype), compute_dtype, layer.name)
        with torch.no_grad():  # precondition of the reference: bnb's forward is F.linear on the dequantised weight
            base = type(layer.module).forward(layer.module, x)
        assert torch.equal(base, torch.nn.functional.linear(x, w.to(compute_dtype)))


def test_peft_arrow_on_4bit_base_matches(phi3_setup, saved_phi3):
    """PEFT's Arrow (GenKnowSub, rng_seed=42) on the original's 4-bit fp16 base, patched in place: as close to a
    float64 run of PEFT's maths on the dequantised weights as PEFT itself, and the same greedy tokens."""
    from peft import ArrowConfig, create_arrow_model

    def peft_model(base):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_arrow_model(
                base, phi3_setup.task, ArrowConfig(top_k=2, use_gks=True, rng_seed=42), phi3_setup.general
            ).eval()

    model4 = load_4bit(saved_phi3, torch.float16)
    deq = dequantised(model4)
    ref_model = peft_model(float64_copy(phi3_setup.base, model4, deq)).double()
    model = peft_model(model4)
    ids = phi3_setup.ids
    with torch.no_grad():
        y_peft = model(ids).logits
        y64 = ref_model(ids).logits
        greedy_peft = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    gkf.patch_model(model)
    assert all(not layer.fused for layer in patched_layers(model).values())
    with torch.no_grad():
        y_ours = model(ids).logits
        greedy_ours = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert_close_to_reference(y_ours, y64, y_peft, torch.float16, "4-bit PEFT Arrow")
    assert torch.equal(greedy_ours, greedy_peft)
