"""make_llm and hf_overrides refuse bad input before vLLM starts (runs without vLLM: nothing here reaches it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import genknowsub_fast as gkf
from genknowsub_fast.integrations.vllm.engine import hf_overrides, make_llm


@pytest.fixture(scope="module")
def saved(tmp_path_factory, phi3_setup):
    root = tmp_path_factory.mktemp("vllm_inputs")
    model_dir = os.path.join(root, "phi3")
    phi3_setup.base.save_pretrained(model_dir)
    lib = gkf.LoraLibrary.from_adapters(phi3_setup.task, phi3_setup.general)
    lib_path = os.path.join(root, "lib.safetensors")
    lib.save(lib_path)
    return model_dir, lib, lib_path, root


def test_hf_overrides_name_the_routed_architecture(saved):
    model_dir, _, lib_path, _ = saved
    over = hf_overrides(model_dir, lib_path, top_k=2)
    assert over == {
        "architectures": ["GenKnowSubPhi3ForCausalLM"],
        "genknowsub_fast": {"library": lib_path, "top_k": 2, "backend": "auto"},  # unset options: the library's
    }


def test_bad_input_is_a_value_error_before_vllm_starts(saved, phi2_setup):
    model_dir, lib, lib_path, root = saved
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        make_llm(model_dir, lib_path, top_k=6)
    with pytest.raises(ValueError, match="temperature must be"):
        make_llm(model_dir, lib, temperature=0.0)
    with pytest.raises(ValueError, match="does not exist"):
        make_llm(model_dir, os.path.join(root, "missing.safetensors"))
    with pytest.raises(ValueError, match="must be a LoraLibrary or the path"):
        make_llm(model_dir, {"library": lib_path})
    with pytest.raises(ValueError, match="may not set"):
        make_llm(model_dir, lib_path, hf_overrides={"architectures": ["Phi3ForCausalLM"]})
    with pytest.raises(ValueError, match="mixing must be"):
        make_llm(model_dir, lib_path, mixing="sum")
    uneven = lib.to()
    first = next(iter(uneven.modules.values()))
    first.scaling = torch.linspace(1.0, 2.0, lib.num_experts)
    with pytest.raises(ValueError, match="one shared scaling"):
        make_llm(model_dir, uneven, mixing="weights")
    with pytest.raises(ValueError, match="cannot read the model config"):
        make_llm(os.path.join(root, "no_model"), lib_path)
    llama_dir = os.path.join(root, "llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    ).save_pretrained(llama_dir)
    with pytest.raises(ValueError, match="supports .* not 'LlamaForCausalLM'"):
        make_llm(llama_dir, lib_path)


def test_plugin_left_out_by_vllm_plugins(saved, monkeypatch):
    model_dir, _, lib_path, _ = saved
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    with pytest.raises(ValueError, match="leaves out 'genknowsub_fast'"):
        make_llm(model_dir, lib_path)


def test_importing_the_public_module_imports_no_vllm():
    code = "import sys, genknowsub_fast, genknowsub_fast.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, genknowsub_fast; assert 'genknowsub_fast.integrations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def no_vllm(monkeypatch):
    """Any import of vllm fails: make_llm must refuse before it starts vLLM."""
    monkeypatch.setitem(sys.modules, "vllm", None)


def test_library_for_another_model_is_refused_before_vllm_starts(saved, phi2_setup, no_vllm):
    """make_llm(model, library for another base model) failed after about 25 s inside vLLM's engine start-up; it is
    now one ValueError naming both, before vLLM is imported."""
    model_dir, lib, lib_path, root = saved
    other = os.path.join(root, "phi2.safetensors")
    gkf.LoraLibrary.from_adapters(phi2_setup.task).save(other)
    message = f"library '{other}' does not fit model '{model_dir}': the library was built for a PhiForCausalLM"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_llm(model_dir, other)
    # same family, a module the model does not have, or another shape
    missing = lib.to()
    missing.modules["model.layers.7.mlp.down_proj"] = missing.modules.pop("model.layers.1.mlp.down_proj")
    with pytest.raises(ValueError, match=r"does not fit model .*1 library modules are not in the model"):
        make_llm(model_dir, missing)
    narrow = lib.to()
    m = narrow.modules["model.layers.0.self_attn.o_proj"]
    narrow.modules["model.layers.0.self_attn.o_proj"] = type(m)(
        m.a[:, :, :-1], m.b, m.scaling, m.prototypes[:, :-1], m.ranks
    )
    with pytest.raises(ValueError, match=r"'the LoraLibrary given' does not fit .* is 64→64 but the library's"):
        make_llm(model_dir, narrow)


def test_base_model_name_is_compared(saved, phi3_setup, no_vllm):
    """A same-shape model with another name than the adapters' base model was served silently: now a warning, and a
    refusal with strict_base_model=True."""
    model_dir, _, _, root = saved
    named = os.path.join(root, "named.safetensors")
    gkf.LoraLibrary.from_adapters(phi3_setup.task, base_model_name="microsoft/Phi-3-mini-4k-instruct").save(named)
    # The check passes with a warning; vLLM (blocked here) would start next.
    with pytest.warns(gkf.BaseModelWarning, match=f"but the model is '{model_dir}'"), pytest.raises(ImportError):
        make_llm(model_dir, named)
    with pytest.raises(ValueError, match="strict_base_model=True refuses another base model name"):
        make_llm(model_dir, named, strict_base_model=True)
    assert hf_overrides(model_dir, named, strict_base_model=True)["genknowsub_fast"]["strict_base_model"] is True
