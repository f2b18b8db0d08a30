"""Backends of the routed-LoRA ops: ``torch_ops`` (portable), ``triton_ops`` (CUDA), ``prototype_ext`` (csrc)."""
