"""A bitsandbytes 4-bit NF4 base on the CPU: patched layers against a float64 reference on the dequantised weights,
and PEFT's Arrow on the same 4-bit model against ours.

The original GenKnowSub code loads Phi-3 with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=False)``; PEFT's 4-bit Arrow test uses bf16 compute.

bitsandbytes runs a 4-bit layer on the CPU in one of two ways, chosen when the layer is built from its own cpuid check
(``bitsandbytes.functional.has_avx512bf16``; torch's ``ATEN_CPU_CAPABILITY`` does not change it):

- "dequant": ``x · dequantize_4bit(W)ᵀ`` with ``F.linear`` in the compute dtype (bit for bit, checked below), on CPUs
  without AVX-512-BF16. The reference of a patched layer is the float64 routed LoRA on top of the dequantised weight.
- "repacked": on CPUs with AVX-512-BF16 the first forward repacks the weight for bitsandbytes' own bf16 kernel, which
  then computes the base output (in bf16, for an fp16 compute dtype too). The repacking needs every in_features to be
  a multiple of the quantisation blocksize and every out_features a multiple of its 32-row tiles, hence the model's
  shapes here (hidden 64, intermediate 128). The base output is then bitsandbytes' kernel's, not ``F.linear``'s, so
  the reference of a patched layer is that base output plus the float64 routed delta.

Every test runs both paths: "dequant" everywhere (each 4-bit layer's AVX-512-BF16 flag is cleared before its first
forward, which is the state bitsandbytes builds on a CPU without it), "repacked" where the CPU has AVX-512-BF16.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, patched_layers, reference
from tests.tolerances import assert_close_to_reference

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed (it is in the [test] extra: pip install -e '.[test]')"
)
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16  # noqa: E402
from bitsandbytes.nn import Linear4bit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BLOCKSIZE = 64  # BitsAndBytesConfig's default 4-bit quantisation blocksize: in_features must be a multiple of it
ROW_TILE = 32  # rows per tile of the repacked layout: out_features must be a multiple of it
HIDDEN, INTERMEDIATE = 64, 128

PATHS = [
    pytest.param("dequant", id="dequant"),
    pytest.param(
        "repacked",
        id="repacked",
        marks=pytest.mark.skipif(
            not has_avx512bf16(),
            reason="bitsandbytes repacks 4-bit weights for its bf16 kernel only on CPUs with AVX-512-BF16; this one "
            "has none",
        ),
    ),
]


@dataclass
class Setup:
    """A tiny random Phi-3 (float32), the directory it is saved in, its task and general adapters, token ids."""

    base: torch.nn.Module
    path: Path
    task: list
    general: list
    ids: torch.Tensor


@pytest.fixture(scope="module")
def phi3_4bit_setup(tmp_path_factory) -> Setup:
    """A tiny random Phi-3 whose projections all have shapes both bitsandbytes CPU paths take, and its adapters."""
    from transformers import Phi3ForCausalLM

    from genknowsub_fast.synthetic import PHI3_TARGETS, phi3_config, write_adapters

    cfg = phi3_config("tiny")
    cfg.hidden_size, cfg.intermediate_size = HIDDEN, INTERMEDIATE
    torch.manual_seed(0)
    base = Phi3ForCausalLM(cfg).eval()
    for name, m in base.named_modules():
        if name.endswith(PHI3_TARGETS):
            assert m.in_features % BLOCKSIZE == 0 and m.out_features % ROW_TILE == 0, (name, m)
    out = tmp_path_factory.mktemp("phi3_4bit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, out / "adapters", 5, 3, rank=4, target_modules=PHI3_TARGETS, seed=1)
    base.save_pretrained(out / "model")
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return Setup(base, out / "model", ad.task, ad.general, ids)


def load_4bit(path, compute_dtype, cpu_path: str):
    """The saved model with NF4 4-bit projections, set to run them on bitsandbytes' ``cpu_path``."""
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
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 8, "every Phi-3 projection is a 4-bit layer"
    for m in layers:
        assert m.weight.quant_state.blocksize == BLOCKSIZE
        if cpu_path == "dequant":
            m.support_avx512bf16_for_cpu = False
        else:
            assert m.support_avx512bf16_for_cpu
    return model.eval()


def assert_on_path(model, cpu_path: str) -> None:
    """After a forward: every 4-bit layer's weight is in the layout of ``cpu_path``."""
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            repacked = bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
            assert repacked == (cpu_path == "repacked"), f"{name}: repacked={repacked} on the {cpu_path} path"


def dequantised(model) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's dequantised weight, by module name (read before any forward: the repacked layout is not
    dequantize_4bit's)."""
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


@pytest.mark.parametrize("cpu_path", PATHS)
@pytest.mark.parametrize(
    "compute_dtype, mixing, top_k",
    [(torch.float16, "weights", 3), (torch.bfloat16, "output", 2)],
    ids=["original-fp16-weights", "peft-bf16-output"],
)
def test_patched_4bit_layers_match_dequantised_reference(phi3_4bit_setup, compute_dtype, mixing, top_k, cpu_path):
    setup = phi3_4bit_setup
    model = load_4bit(setup.path, compute_dtype, cpu_path)
    deq = dequantised(model)
    lib = LoraLibrary.from_adapters(setup.task, setup.general)
    gkf.patch_model(model, lib, top_k=top_k, mixing=mixing)
    layers = patched_layers(model)
    inputs = {}
    for layer in layers.values():
        assert not layer.fused and layer.runner.packed.a.dtype == torch.float32  # PEFT's and the original's
        layer.recorder = lambda lay, x: inputs.setdefault(lay.name, x.detach().clone())
    with torch.no_grad():
        model(setup.ids)
    assert_on_path(model, cpu_path)
    assert set(inputs) == set(lib.modules)
    for name, layer in layers.items():
        layer.recorder = None
        x = inputs[layer.name].reshape(-1, inputs[layer.name].shape[-1])
        w = deq[name]
        m = lib.modules[layer.name]
        with torch.no_grad():
            ours = layer.module(x)
            base = type(layer.module).forward(layer.module, x)  # bitsandbytes' own base output

        def ref(dt, m=m, x=x, weight=None):
            return reference.routed_lora(
                x.to(dt), m.a.to(dt), m.b.to(dt), m.scaling.to(dt), m.prototypes.to(dt), top_k, 1.0, mixing,
                weight=None if weight is None else weight.to(dt),
            )  # fmt: skip

        if cpu_path == "dequant":
            # Precondition of the reference: bnb's forward is F.linear on the dequantised weight, bit for bit.
            assert torch.equal(base, torch.nn.functional.linear(x, w.to(compute_dtype)))
            ref64, ref_low = ref(torch.float64, weight=w), ref(compute_dtype, weight=w)
        else:
            ref64 = base.double() + ref(torch.float64)
            ref_low = base + ref(compute_dtype)
        assert_close_to_reference(ours, ref64, ref_low, compute_dtype, f"{layer.name} ({cpu_path})")


@pytest.mark.parametrize("cpu_path", PATHS)
def test_peft_arrow_on_4bit_base_matches(phi3_4bit_setup, cpu_path):
    """PEFT's Arrow (GenKnowSub, rng_seed=42) on the original's 4-bit fp16 base, patched in place: as close to a
    float64 run of PEFT's maths on the dequantised weights as PEFT itself, and the same greedy tokens."""
    from peft import ArrowConfig, create_arrow_model

    setup = phi3_4bit_setup

    def peft_model(base):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_arrow_model(
                base, setup.task, ArrowConfig(top_k=2, use_gks=True, rng_seed=42), setup.general
            ).eval()

    model4 = load_4bit(setup.path, torch.float16, cpu_path)
    deq = dequantised(model4)
    ref_model = peft_model(float64_copy(setup.base, model4, deq)).double()
    model = peft_model(model4)
    ids = setup.ids
    with torch.no_grad():
        y_peft = model(ids).logits
        y64 = ref_model(ids).logits
        greedy_peft = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert_on_path(model, cpu_path)
    gkf.patch_model(model)
    assert all(not layer.fused for layer in patched_layers(model).values())
    with torch.no_grad():
        y_ours = model(ids).logits
        greedy_ours = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert_close_to_reference(y_ours, y64, y_peft, torch.float16, f"4-bit PEFT Arrow ({cpu_path})")
    assert torch.equal(greedy_ours, greedy_peft)
