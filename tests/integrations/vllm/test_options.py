"""Routing options carried in the HF config, and the routed architecture names (no vLLM needed)."""

from __future__ import annotations

import pytest

from genknowsub_fast.integrations.vllm.options import (
    CONFIG_KEY,
    ROUTED_ARCHITECTURES,
    ServedOptions,
    routed_architecture,
)


def test_round_trip_through_the_config_dict():
    opts = ServedOptions("lib.safetensors", top_k=2, temperature=0.5, mixing="weights")
    assert ServedOptions.from_dict(opts.to_dict()) == opts
    defaults = {"library": "x", "backend": "auto"}  # unset routing options are resolved against the library
    assert ServedOptions.from_dict({"library": "x"}).to_dict() == defaults

    class Config:
        pass

    cfg = Config()
    setattr(cfg, CONFIG_KEY, opts.to_dict())
    assert ServedOptions.from_config(cfg) == opts
    with pytest.raises(ValueError, match="needs routing options"):
        ServedOptions.from_config(Config())


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"top_k": 2}, "needs a 'library'"),
        ({"library": "x", "topk": 2}, "unknown genknowsub_fast option"),
        ({"library": "x", "top_k": 2.0}, "top_k must be an integer"),
        ({"library": "x", "top_k": True}, "top_k must be an integer"),
        ({"library": "x", "top_k": 0}, "top_k must be an integer >= 1"),
        ({"library": "x", "temperature": 0}, "temperature must be"),
        ({"library": "x", "temperature": float("nan")}, "temperature must be"),
        ({"library": "x", "mixing": "sum"}, "mixing must be"),
        ({"library": "x", "backend": "cuda"}, "backend must be"),
        ({"library": ""}, "library must be"),
        ("lib.safetensors", "must be a dict"),
    ],
)
def test_bad_options_are_value_errors(raw, match):
    with pytest.raises(ValueError, match=match):
        ServedOptions.from_dict(raw)


def test_routed_architectures():
    assert routed_architecture("Phi3ForCausalLM") == ROUTED_ARCHITECTURES["Phi3ForCausalLM"]
    assert routed_architecture("GenKnowSubPhiForCausalLM") == "GenKnowSubPhiForCausalLM"
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        routed_architecture("LlamaForCausalLM")
