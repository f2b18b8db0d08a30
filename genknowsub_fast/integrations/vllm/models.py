"""Routed architectures registered by the plugin: vLLM's own Phi-3 and Phi-2 classes with routed linear layers.

Each is the stock vLLM class plus one step at the end of ``__init__``: the layers the library targets get their
routed delta (``layers.attach_routing``). The routing is attached when the layers exist, before any weights are read,
so every load format (safetensors, dummy, sharded state, ...) serves the routed model; the routed delta reads none of
the base weights. The routing options come from the HF config (see ``options``).
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.transformers import TransformersForCausalLM

from genknowsub_fast.integrations.vllm.layers import attach_routing
from genknowsub_fast.integrations.vllm.options import ServedOptions

# vLLM configures only the "vllm" logger tree, so the message goes there to show next to vLLM's own.
logger = init_logger("vllm.genknowsub_fast")


class RoutedModelMixin:
    """Adds GenKnowSub + Arrow routing to a vLLM model class; put it first in the bases."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        options = ServedOptions.from_config(vllm_config.model_config.hf_config)  # fail before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        routed = attach_routing(self, options, vllm_config.device_config.device, vllm_config.model_config.dtype)
        runner = next(iter(routed.values())).parts[0].runner
        logger.info(
            "genknowsub_fast: %d linear layers routed through %s (%s)",
            len(routed),
            options.library,
            runner.options,
        )


class GenKnowSubPhi3ForCausalLM(RoutedModelMixin, Phi3ForCausalLM):
    """vLLM's Phi-3 with routed qkv_proj / gate_up_proj (column-parallel, fused) and o_proj / down_proj (row)."""


class GenKnowSubPhiForCausalLM(RoutedModelMixin, TransformersForCausalLM):
    """Phi-2 through vLLM's Transformers backend (fused q/k/v, column fc1, row dense / fc2), routed."""


__all__ = ["GenKnowSubPhi3ForCausalLM", "GenKnowSubPhiForCausalLM", "RoutedModelMixin"]
