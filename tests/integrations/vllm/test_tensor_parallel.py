"""make_llm with tensor_parallel_size=2 on vLLM's CPU build: sharded routed layers, all-reduced routing scores, and
the same outputs as the unsharded model patched in transformers (Phi-3 and Phi-2)."""

from __future__ import annotations

import os

import pytest

from tests.integrations.vllm.served import PROMPTS, assert_matches, require_vllm, vllm_outputs
from tests.tolerances import FP32_ENGINE_LOGPROB_ATOL

require_vllm()

from tests.integrations.vllm.test_engine import Served, _layer_summary  # noqa: E402 (imports vLLM)

pytestmark = pytest.mark.slow
ATOL = FP32_ENGINE_LOGPROB_ATOL


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="2 tensor-parallel ranks need 2 CPU cores (one each)")
@pytest.mark.parametrize("family", ["phi3", "phi2"])
def test_two_tensor_parallel_ranks(tmp_path, family):
    """tensor_parallel_size=2 on the CPU: one core per rank (vLLM's automatic binding also reserves a core, which a
    2-core machine does not have). Sharded layers, all-reduced scores, same outputs as the unsharded reference."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        s = Served(str(tmp_path), family, library_as_object=False, tensor_parallel_size=2, enforce_eager=True)
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    try:
        ranks = s.llm.apply_model(_layer_summary)
        out = vllm_outputs(s.llm, PROMPTS)
    finally:
        s.close()
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    cfg = s.ckpt.model.config
    for name, (d_out, partial, _) in ranks[0].items():
        row = name.endswith(("o_proj", "down_proj", "dense", "fc2"))
        assert partial == row, name
        if name.endswith("qkv_proj"):
            assert d_out == 3 * cfg.hidden_size // 2, "each rank holds half the heads of q, k and v"
        if name.endswith("gate_up_proj"):
            assert d_out == cfg.intermediate_size, "each rank holds half of gate and half of up"
    assert_matches(out, s.ref, ATOL, f"{family} tensor_parallel_size=2")
