"""Randomly initialised Phi-3 and Phi-2 causal LMs of fixed sizes, for the demo, the tests and the benchmarks (no
model hub needed), and what building one costs in memory.
"""

from __future__ import annotations

import torch
from torch import nn

PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PHI2_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")

# name → (hidden, intermediate, layers, heads, vocab)
PHI3_SIZES = {
    "tiny": (64, 96, 2, 4, 128),
    "small": (256, 512, 2, 8, 512),
    "bench": (1024, 2816, 4, 16, 2048),
    "phi3-mini": (3072, 8192, 32, 32, 32064),
}


def phi3_config(size: str = "tiny"):
    """The ``Phi3Config`` of one of :data:`PHI3_SIZES` (eager attention)."""
    from transformers import Phi3Config

    if size not in PHI3_SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {list(PHI3_SIZES)}")
    hidden, inter, layers, heads, vocab = PHI3_SIZES[size]
    return Phi3Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )


def make_phi3(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised Phi-3 causal LM of one of :data:`PHI3_SIZES` (eager attention, eval mode)."""
    from transformers import Phi3ForCausalLM

    cfg = phi3_config(size)
    torch.manual_seed(seed)
    return Phi3ForCausalLM(cfg).to(dtype).eval()


def phi3_num_parameters(size: str) -> int:
    """Parameters of :func:`make_phi3` ``(size)``, counted on the meta device (nothing is allocated; ~0.1 s)."""
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(phi3_config(size))
    return sum(p.numel() for p in model.parameters())


def check_phi3_fits(size: str, copies: int = 1, dtype: torch.dtype = torch.float32) -> str:
    """Describe what building ``copies`` random Phi-3 ``size`` models costs, or raise ValueError before anything is
    built when that is more memory than this process has left (:func:`genknowsub_fast.memory.check_fits`)."""
    from ..memory import check_fits, human_bytes

    n = phi3_num_parameters(size)
    need = copies * n * torch.empty(0, dtype=dtype).element_size()
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    what = f"random Phi-3 '{size}': {count} parameters, {human_bytes(need)} in {str(dtype).split('.')[-1]}"
    what += f" for {copies} copies" if copies > 1 else ""
    return check_fits(need, what, hint="choose a smaller size")


def make_phi2(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny randomly initialised Phi-2 (``PhiForCausalLM``) causal LM."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return PhiForCausalLM(cfg).to(dtype).eval()


__all__ = [
    "PHI3_TARGETS",
    "PHI2_TARGETS",
    "PHI3_SIZES",
    "phi3_config",
    "make_phi3",
    "make_phi2",
    "phi3_num_parameters",
    "check_phi3_fits",
]
