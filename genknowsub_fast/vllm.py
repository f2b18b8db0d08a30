"""Serve a GenKnowSub + Arrow library with vLLM: routed LoRA inside vLLM's own Phi-3 / Phi-2 linear layers.

    from genknowsub_fast.vllm import make_llm
    llm = make_llm("path/to/phi3", "lib.safetensors", top_k=3, dtype="bfloat16")

``hf_overrides(model, library_path, ...)`` gives the same routing to ``vllm serve MODEL --hf-overrides '<JSON>'``.
This module only re-exports ``genknowsub_fast.integrations.vllm`` (absolute imports: the name ``vllm`` inside this
package never stands for vLLM itself).
"""

from genknowsub_fast.integrations.vllm.engine import hf_overrides, make_llm

__all__ = ["hf_overrides", "make_llm"]
