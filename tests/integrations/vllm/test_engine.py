"""make_llm end to end on vLLM's CPU build: Phi-3 (compiled, vLLM's default) and Phi-2 (eager) against the same model
patched with patch_model in transformers, and per-token routing (2 tensor-parallel ranks: test_tensor_parallel.py)."""

from __future__ import annotations

import gc
import importlib
import os
import sys

import pytest

from tests.integrations.vllm.served import (
    LLM_KWARGS,
    PROMPTS,
    TEMPERATURE,
    TOP_K,
    Reference,
    assert_matches,
    layer0_routing,
    make_checkpoint,
    max_logprob_change,
    require_vllm,
    shutdown,
    transformers_reference,
    vllm_outputs,
)
from tests.tolerances import FP32_ENGINE_LOGPROB_ATOL, MIN_ADAPTER_EFFECT

require_vllm()

from genknowsub_fast.integrations.vllm.layers import routed_layers  # noqa: E402 (imports vLLM)
from genknowsub_fast.vllm import make_llm  # noqa: E402

pytestmark = pytest.mark.slow
ATOL = FP32_ENGINE_LOGPROB_ATOL


def _layer_summary(model) -> dict:
    """What each worker reports of its routed layers: local d_out and whether the scores are all-reduced."""
    return {name: (r.d_out, r.partial_scores, len(r.parts)) for name, r in routed_layers(model).items()}


class Served:
    """One checkpoint served by make_llm, with the transformers references computed before vLLM started."""

    def __init__(self, root: str, family: str, library_as_object: bool, **llm_kwargs):
        self.ckpt = make_checkpoint(root, family)
        self.routing = layer0_routing(self.ckpt)
        self.base = transformers_reference(self.ckpt, patch=False)
        self.ref = transformers_reference(self.ckpt)
        library = self.ckpt.library if library_as_object else self.ckpt.library_path
        kwargs = {**LLM_KWARGS, **llm_kwargs}
        self.llm = make_llm(self.ckpt.path, library, top_k=TOP_K, temperature=TEMPERATURE, **kwargs)

    def close(self) -> None:
        """Stop the engine; a LoraLibrary given as an object was saved to a temporary file, which goes with the LLM."""
        library = self.llm.llm_engine.model_config.hf_config.genknowsub_fast["library"]
        shutdown(self.llm)
        del self.llm
        gc.collect()
        if library != self.ckpt.library_path:
            assert not os.path.exists(library), "make_llm's temporary library file outlived its LLM"


@pytest.fixture(scope="module", params=["phi3", "phi2"])
def served(request, tmp_path_factory):
    family = request.param
    # Phi-3 runs vLLM's default compiled path (the routed delta as custom ops in the graph); Phi-2 runs eager, and
    # gets its library as a LoraLibrary object (saved to a temporary file for the workers).
    eager = family == "phi2"
    s = Served(str(tmp_path_factory.mktemp(f"vllm_{family}")), family, library_as_object=eager, enforce_eager=eager)
    yield s
    s.close()


def test_batch_matches_patched_transformers(served):
    """Prompts of different lengths in one batch: prompt log-probs and greedy tokens as the patched HF model's."""
    effect = max_logprob_change(served.ref, served.base)
    assert effect > MIN_ADAPTER_EFFECT, f"the experts must change the output to test anything ({effect:.2e})"
    assert_matches(vllm_outputs(served.llm, PROMPTS), served.ref, ATOL, "batched")


def test_routing_is_per_token(served):
    """Tokens of one request pick different experts, and each request's tokens route differently from another's, so
    a per-request routing could not match the per-token reference; batched and one-by-one runs both match it."""
    tokens_0 = {tuple(sorted(t.tolist())) for t in served.routing[0]}
    tokens_1 = {tuple(sorted(t.tolist())) for t in served.routing[1]}
    assert len(tokens_0) > 1, "tokens of one request must pick different expert sets for this test to mean anything"
    assert tokens_0 != tokens_1
    both = vllm_outputs(served.llm, PROMPTS[:2])
    assert_matches(both, Reference(served.ref.logprobs[:2], served.ref.greedy[:2]), ATOL, "two requests batched")
    for i in range(2):
        alone = vllm_outputs(served.llm, [PROMPTS[i]])
        assert_matches(alone, Reference([served.ref.logprobs[i]], [served.ref.greedy[i]]), ATOL, f"prompt {i} alone")


def test_every_library_module_is_routed(served):
    (layers,) = served.llm.apply_model(_layer_summary)
    modules = served.ckpt.library.modules
    if served.ckpt.model.config.model_type == "phi":
        # vLLM fuses q/k/v: one routed layer per attention block fed by three library modules.
        assert len(layers) == len(modules) - 2 * served.ckpt.model.config.num_hidden_layers
        assert all(n == 3 for name, (_, _, n) in layers.items() if name.endswith("qkv_proj"))
    else:
        assert set(layers) == set(modules)
    assert not any(partial for _, partial, _ in layers.values()), "one rank: no score all-reduce"


def test_public_module_does_not_shadow_vllm():
    importlib.import_module("genknowsub_fast.vllm")  # first, so a shadowing module would win the name
    import vllm

    assert vllm.__name__ == "vllm" and hasattr(vllm, "LLM")
    assert "genknowsub_fast" not in (vllm.__file__ or "")
    assert sys.modules["vllm"] is vllm


def test_plugin_registration_is_idempotent():
    from vllm import ModelRegistry

    from genknowsub_fast.integrations.vllm import plugin
    from genknowsub_fast.integrations.vllm.options import ROUTED_ARCHITECTURES

    plugin.register()
    plugin.register()
    assert set(ROUTED_ARCHITECTURES.values()) <= set(ModelRegistry.get_supported_archs())
