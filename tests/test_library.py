"""LoraLibrary: GKS modes against reference.py, prototypes, save/load, PEFT models, and bad input."""

import copy
import json
import shutil
import warnings

import pytest
import torch

from genknowsub_fast import LoraLibrary, reference
from genknowsub_fast.adapters import read_adapter
from genknowsub_fast.synthetic import make_phi3, write_adapters
from tests.tolerances import FP32_PRODUCT, PROTOTYPE_MIN_COS

QKV = "model.layers.0.self_attn.qkv_proj"


def test_param_gks_matches_reference(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    tasks = [read_adapter(p) for p in phi3_setup.task]
    gen = [read_adapter(p) for p in phi3_setup.general]
    for path, m in lib.modules.items():
        ref = reference.gks_param([(t.a[path], t.b[path]) for t in tasks], [(g.a[path], g.b[path]) for g in gen])
        for i, (a, b) in enumerate(ref):
            torch.testing.assert_close(m.a[i], a)
            torch.testing.assert_close(m.b[i], b)
        assert m.scaling.tolist() == [t.scaling[path] for t in tasks]
    assert lib.gks == "param" and lib.general_names == ["general_0", "general_1", "general_2"]
    assert lib.expert_names == [f"task_{i}" for i in range(5)]


def test_no_general_adapters_means_no_gks(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task)
    assert lib.gks is None
    torch.testing.assert_close(lib.modules[QKV].a[2], read_adapter(phi3_setup.task[2]).a[QKV])


def test_exact_prototypes_match_svd(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    for m in lib.modules.values():
        ref = reference.prototypes_svd(m.a.double(), m.b.double())
        assert float((m.prototypes.double() * ref).sum(1).abs().min()) >= PROTOTYPE_MIN_COS


def test_power_prototypes_are_close_on_decaying_spectra(phi3_setup):
    exact = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    power = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, prototypes="power", rng_seed=0)
    assert power.prototype_method == "power"
    for p, m in exact.modules.items():
        assert float((m.prototypes * power.modules[p].prototypes).sum(1).abs().min()) > 0.9999


@pytest.fixture(scope="module")
def mixed_rank_adapters(tmp_path_factory):
    base = make_phi3("tiny")
    out = tmp_path_factory.mktemp("mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(base, out, 3, 2, rank=3, task_ranks=[2, 4, 3], seed=4)
    return base, ad


def test_delta_gks_with_mixed_ranks_matches_reference(mixed_rank_adapters):
    _, ad = mixed_rank_adapters
    lib = LoraLibrary.from_adapters(ad.task, ad.general, gks="delta")
    tasks = [read_adapter(p) for p in ad.task]
    gen = [read_adapter(p) for p in ad.general]
    m = lib.modules[QKV]
    ref = reference.gks_delta(
        [(t.a[QKV].double(), t.b[QKV].double(), t.scaling[QKV]) for t in tasks],
        [(g.a[QKV].double(), g.b[QKV].double(), g.scaling[QKV]) for g in gen],
    )
    assert m.ranks.tolist() == [2 + 6, 4 + 6, 3 + 6] and m.a.shape[1] == 10
    assert m.scaling.tolist() == [1.0, 1.0, 1.0]
    for i, (a, b, _) in enumerate(ref):
        torch.testing.assert_close((m.b[i] @ m.a[i]).double(), b @ a, **FP32_PRODUCT)
        r = m.ranks[i]
        assert torch.all(m.a[i, r:] == 0) and torch.all(m.b[i, :, r:] == 0)


def test_param_gks_with_mixed_ranks_is_refused(mixed_rank_adapters):
    _, ad = mixed_rank_adapters
    with pytest.raises(ValueError, match='gks="delta"'):
        LoraLibrary.from_adapters(ad.task, ad.general, gks="param")


def test_save_load_round_trip(phi3_setup, tmp_path):
    lib = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, names=list("abcde"))
    lib.save(tmp_path / "lib.safetensors")
    back = LoraLibrary.load(tmp_path / "lib.safetensors")
    assert back.expert_names == list("abcde") and back.gks == "param"
    assert back.general_names == lib.general_names and back.base_model_class == "Phi3ForCausalLM"
    assert list(back.modules) == list(lib.modules)
    for p, m in lib.modules.items():
        for field in ("a", "b", "scaling", "prototypes", "ranks"):
            assert torch.equal(getattr(m, field), getattr(back.modules[p], field))
    assert "5 experts" in repr(back) and "gks='param'" in repr(back)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LoraLibrary.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a genknowsub_fast library"):
        LoraLibrary.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="cannot read library"):
        LoraLibrary.load(tmp_path / "junk.safetensors")


def test_to_dtype(phi3_setup):
    lib = LoraLibrary.from_adapters(phi3_setup.task, dtype=torch.bfloat16)
    assert lib.dtype == torch.bfloat16 and lib.modules[QKV].scaling.dtype == torch.float32
    assert lib.to(dtype=torch.float32).dtype == torch.float32


def test_bad_inputs(phi3_setup, tmp_path):
    with pytest.raises(ValueError, match="at least one task adapter"):
        LoraLibrary.from_adapters([])
    with pytest.raises(ValueError, match="does not exist"):
        LoraLibrary.from_adapters([tmp_path / "nope"])
    with pytest.raises(ValueError, match="gks must be"):
        LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general, gks="mean")
    with pytest.raises(ValueError, match="prototypes must be"):
        LoraLibrary.from_adapters(phi3_setup.task, prototypes="random")
    with pytest.raises(ValueError, match="names given"):
        LoraLibrary.from_adapters(phi3_setup.task, names=["a"])


def test_adapters_for_another_base_model(phi3_setup, phi2_setup, tmp_path):
    with pytest.raises(ValueError, match="different base models"):
        LoraLibrary.from_adapters([phi3_setup.task[0], phi2_setup.task[0]])
    other = shutil.copytree(phi3_setup.task[1], tmp_path / "other")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/some-other-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    first = shutil.copytree(phi3_setup.task[0], tmp_path / "first")
    cfg["base_model_name_or_path"] = "microsoft/Phi-3-mini-4k-instruct"
    (first / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different base models"):
        LoraLibrary.from_adapters([first, other])


def test_zero_expert_warns(phi3_setup, tmp_path):
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(phi3_setup.task[0], tmp_path / "zero")
    state = {
        k: torch.zeros_like(v) if "lora_B" in k else v for k, v in load_file(d / "adapter_model.safetensors").items()
    }
    save_file(state, d / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="ΔW = 0"):
        lib = LoraLibrary.from_adapters([d] + phi3_setup.task[1:])
    assert torch.all(lib.modules[QKV].prototypes[0] == 0)


def test_from_peft_model_before_and_after_peft_applied_gks(phi3_setup):
    from peft import ArrowConfig, create_arrow_model

    expected = LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = create_arrow_model(
            copy.deepcopy(phi3_setup.base),
            phi3_setup.task,
            ArrowConfig(top_k=2, router_temperature=0.5, use_gks=True),
            phi3_setup.general,
        )
    before = LoraLibrary.from_peft_model(pm)
    with torch.no_grad():
        pm(phi3_setup.ids)  # PEFT subtracts the general mean in place on the first forward
    after = LoraLibrary.from_peft_model(pm)
    for lib in (before, after):
        assert lib.gks == "param" and lib.routing == {"top_k": 2, "temperature": 0.5}
        for p, m in expected.modules.items():
            torch.testing.assert_close(lib.modules[p].a, m.a)
            torch.testing.assert_close(lib.modules[p].b, m.b)


def test_from_peft_model_needs_an_arrow_model(phi3_setup):
    with pytest.raises(ValueError, match="no PEFT Arrow layers"):
        LoraLibrary.from_peft_model(phi3_setup.base)
