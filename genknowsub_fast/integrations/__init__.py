"""Bridges to other projects' models and tools: PEFT Arrow models, lm-evaluation-harness, vLLM.

The core (library, ops, kernels, patching) never imports this package when it is imported: ``patch_model`` imports
``integrations.peft`` only when it is given a PEFT Arrow model, and :meth:`LoraLibrary.from_peft_model` reaches
``integrations.peft`` through the ``genknowsub_fast.model_readers`` entry point (the integration imports the
library, so the library must not import it).
"""
