"""Reading PEFT adapter directories: key mapping, scalings, and refusal of what cannot be used."""

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from genknowsub_fast.library.adapters import read_adapter


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
    with pytest.raises(ValueError, match="allow_pickle=True") as exc:
        read_adapter(d)
    from genknowsub_fast.library.adapters import PickledAdapterError  # the command line catches it to name its own flag

    assert isinstance(exc.value, PickledAdapterError) and exc.value.path == str(d)
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


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for code a malicious adapter_model.bin would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_bin_is_loaded_without_running_code(phi3_setup, tmp_path):
    """allow_pickle=True used torch.load(weights_only=False), so a payload in the file ran (here it would
    create ``marker``). A state dict needs only weights_only=True, which refuses the payload."""
    d = _copy(phi3_setup.task[0], tmp_path / "a")
    state = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "payload_ran"
    torch.save({**state, "payload": _Payload(marker)}, d / "adapter_model.bin")
    with pytest.raises(ValueError, match=re.escape(f"adapter '{d}': adapter_model.bin is not a plain state dict")):
        read_adapter(d, allow_pickle=True)
    assert not marker.exists(), "loading the adapter ran the pickled payload"


def test_truncated_or_corrupt_files_name_the_adapter(phi3_setup, tmp_path):
    """a truncated adapter_model.safetensors raised a raw SafetensorError that did not say which adapter
    (and garbage adapter_config.json a bare JSONDecodeError)."""
    d = _copy(phi3_setup.task[0], tmp_path / "cut")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"adapter '{d}': adapter_model.safetensors cannot be read")):
        read_adapter(d)
    d = _copy(phi3_setup.task[0], tmp_path / "cfg")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"adapter '{d}': adapter_config.json cannot be read")):
        read_adapter(d)
    (d / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_adapter(d)


def test_integer_factors_are_refused(phi3_setup, tmp_path):
    d = _copy(phi3_setup.task[0], tmp_path / "a")
    state = load_file(d / "adapter_model.safetensors")
    key = next(k for k in state if "lora_A" in k)
    state[key] = (state[key] * 100).to(torch.int32)
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="torch.int32; LoRA factors are floating-point"):
        read_adapter(d)


def test_modules_to_save_tensors_are_refused_or_listed(phi3_setup, tmp_path):
    """At the adapter level: a full-module tensor named by modules_to_save is refused with a pointer to
    the option, or left out and listed in ignored_modules; other unknown tensors stay errors either way."""
    d = _copy(phi3_setup.task[0], tmp_path / "a", modules_to_save=["lm_head"])
    state = load_file(d / "adapter_model.safetensors")
    state["base_model.model.lm_head.weight"] = torch.zeros(128, 64)
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="whole module 'lm_head'.*ignore_modules_to_save=True"):
        read_adapter(d)
    ad = read_adapter(d, ignore_modules_to_save=True)
    assert ad.ignored_modules == ["lm_head"] and "lm_head" not in ad.a
    state["base_model.model.model.norm.weight"] = torch.zeros(64)
    save_file(state, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor"):
        read_adapter(d, ignore_modules_to_save=True)
