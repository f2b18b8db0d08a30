"""Serving GenKnowSub + Arrow with vLLM (public entry: ``genknowsub_fast.vllm``).

- ``options``: the routing options carried in the HF config, the routed architecture names (no vLLM import);
- ``sharding``: tensor-parallel maths of the routed delta (no vLLM import);
- ``custom_ops``: the delta as torch custom ops for vLLM's compiled path (no vLLM import);
- ``layers``: wrapping vLLM's linear layers; ``models``: the routed Phi-3 / Phi-2 classes; ``plugin``: the
  ``vllm.general_plugins`` entry point; ``engine``: ``make_llm`` and ``hf_overrides``.

Nothing here is imported by ``import genknowsub_fast``.
"""
