"""Reading PEFT adapter directories: key mapping, scalings, and refusal of what cannot be used."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from genknowsub_fast.adapters import read_adapter


def _copy(src, dst, **cfg_changes):
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(cfg_changes)
    path.write_text(json.dumps(cfg))
    return dst


def test_keys_map_to_module_paths_and_scaling(phi3_setup):
    ad = read_adapter(phi3_setup.task[0])
    assert "model.layers.0.self_attn.qkv_proj" in ad.a
    assert ad.scaling["model.layers.0.self_attn.qkv_proj"] == 8 / 4  # lora_alpha = 2r
    assert ad.base_model_class == "Phi3ForCausalLM"
    assert ad.a["model.layers.1.mlp.down_proj"].shape[0] == 4


def test_rslora_and_alpha_pattern(phi3_setup, tmp_path):
    d = _copy(phi3_setup.task[0], tmp_path / "a", use_rslora=True, alpha_pattern={"o_proj": 3.0})
    ad = read_adapter(d)
    assert ad.scaling["model.layers.0.self_attn.o_proj"] == pytest.approx(3.0 / math.sqrt(4))
    assert ad.scaling["model.layers.0.self_attn.qkv_proj"] == pytest.approx(8 / math.sqrt(4))


def test_rank_pattern_must_match_weights(phi3_setup, tmp_path):
    d = _copy(phi3_setup.task[0], tmp_path / "a", rank_pattern={"qkv_proj": 2})
    with pytest.raises(ValueError, match="config says rank 2"):
        read_adapter(d)


@pytest.mark.parametrize(
    "change, match",
    [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "only LoRA"), ({"bias": "all"}, "bias")],
)
def test_unsupported_configs(phi3_setup, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        read_adapter(_copy(phi3_setup.task[0], tmp_path / "a", **change))


def test_missing_files(tmp_path, phi3_setup):
    with pytest.raises(ValueError, match="not a directory"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        read_adapter(tmp_path / "empty")
    d = _copy(phi3_setup.task[0], tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        read_adapter(d)


def test_nan_weights_are_refused(phi3_setup, tmp_path):
    d = _copy(phi3_setup.task[0], tmp_path / "a")
    state = load_file(d / "adapter_model.safetensors")
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="NaN or Inf"):
        read_adapter(d)


def test_pickled_bin_needs_allow_pickle(phi3_setup, tmp_path):
    d = _copy(phi3_setup.task[0], tmp_path / "a")
    state = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    torch.save(state, d / "adapter_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        read_adapter(d)
    ad = read_adapter(d, allow_pickle=True)
    torch.testing.assert_close(
        ad.a["model.layers.0.self_attn.qkv_proj"],
        state["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"],
    )


def test_embedding_lora_is_refused(phi3_setup, tmp_path):
    d = _copy(phi3_setup.task[0], tmp_path / "a")
    state = load_file(d / "adapter_model.safetensors")
    state["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="'model.embed_tokens' is an embedding LoRA"):
        read_adapter(d)


@pytest.mark.parametrize("dims, kind", [(3, "Conv1d"), (4, "Conv2d")])
def test_conv_lora_is_refused(phi3_setup, tmp_path, dims, kind):
    """A convolution LoRA (3-D / 4-D lora_A, as PEFT saves for nn.Conv1d / nn.Conv2d) is named with its kind."""
    d = _copy(phi3_setup.task[0], tmp_path / "a")
    state = load_file(d / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    state[key] = state[key].reshape(*state[key].shape, *([1] * (dims - 2))).contiguous()
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"'model.layers.0.self_attn.o_proj' is a {kind} \\(convolution\\) LoRA"):
        read_adapter(d)
