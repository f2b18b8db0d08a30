"""Bridges to other projects' models and tools: PEFT Arrow models, lm-evaluation-harness, vLLM.

The core (library, ops, kernels, patching) never imports this package when it is imported; the PEFT entry points of
the core (:meth:`LoraLibrary.from_peft_model`, ``patch_model(peft_arrow_model)``) import ``integrations.peft`` only
when they are called.
"""
