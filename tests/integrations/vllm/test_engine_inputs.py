"""make_llm and hf_overrides refuse bad input before vLLM starts (runs without vLLM: nothing here reaches it)."""

from __future__ import annotations

import os
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
