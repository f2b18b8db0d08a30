"""Shared pieces of the vLLM tests: the vLLM gate, tiny checkpoints on disk, the transformers reference, vLLM runs.

vLLM's CPU attention needs a head size of at least 32, so the models here have 2 heads of 32 (the package's tiny test
models have 4 heads of 16).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import pytest
import torch

import genknowsub_fast as gkf

REQUIRE_ENV = "GENKNOWSUB_FAST_REQUIRE_VLLM"
TOP_K, TEMPERATURE = 2, 1.0
NEW_TOKENS = 8
# Prompts of different lengths (token ids: the tests run vLLM without a tokenizer).
PROMPTS = [
    [1, 5, 9, 33, 7, 100, 4, 61, 17],
    [1, 50, 60],
    [1, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 12, 13],
]

# What every vLLM process of these tests gets: no model hub, a 1 GiB KV cache (on CPU, gpu_memory_utilization
# reserves host memory), and apply_model's function shipped to the workers (tests inspect the routed layers there).
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}
LLM_KWARGS = dict(skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.1, max_model_len=256)


def require_vllm():
    """The vllm module; a skip where it is not installed, a failure where the vLLM tests must run (make test-vllm)."""
    try:
        import vllm
    except Exception as exc:  # ImportError, or a broken install (e.g. an incompatible torchvision)
        msg = f"vllm is not importable here: {type(exc).__name__}: {exc}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg, allow_module_level=True)
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    return vllm


@dataclass
class Checkpoint:
    """A random model saved for vLLM, its library (saved and in memory) and the model object for the reference."""

    model: torch.nn.Module
    path: str
    library: gkf.LoraLibrary
    library_path: str
    first_module: str  # a library module of layer 0 that reads the layer's normalised input


def make_checkpoint(root: str, family: str) -> Checkpoint:
    """Save a tiny random Phi-3 (``family="phi3"``) or Phi-2 (``"phi2"``) and a GKS library of 5 task experts."""
    from transformers import Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM

    from genknowsub_fast.synthetic import PHI2_TARGETS, PHI3_TARGETS, write_adapters

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    if family == "phi3":
        model, targets, first = Phi3ForCausalLM(Phi3Config(**common)), PHI3_TARGETS, "self_attn.qkv_proj"
    else:
        model, targets, first = PhiForCausalLM(PhiConfig(**common)), PHI2_TARGETS, "self_attn.q_proj"
    model = model.eval()
    path = os.path.join(root, family)
    model.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = write_adapters(model, os.path.join(root, f"{family}_adapters"), 5, 3, rank=4, target_modules=targets)
    lib = gkf.LoraLibrary.from_adapters(ad.task, ad.general)
    lib_path = os.path.join(root, f"{family}.safetensors")
    lib.save(lib_path)
    return Checkpoint(model, path, lib, lib_path, f"model.layers.0.{first}")


@dataclass
class Reference:
    """Per prompt: log-probs of tokens 1.. given the prefix (float64 from float32 logits), greedy continuation."""

    logprobs: list[torch.Tensor]
    greedy: list[list[int]]


def transformers_reference(ckpt: Checkpoint, patch: bool = True) -> Reference:
    """The patched (or, ``patch=False``, the base) transformers model on :data:`PROMPTS`, one prompt at a time.

    Call it before starting vLLM in the same process: vLLM's Transformers backend rewrites transformers' Phi classes.
    """
    if patch:
        gkf.patch_model(ckpt.model, ckpt.library, top_k=TOP_K, temperature=TEMPERATURE)
    logprobs, greedy = [], []
    try:
        for p in PROMPTS:
            ids = torch.tensor([p])
            with torch.no_grad():
                lp = torch.log_softmax(ckpt.model(ids).logits[0].double(), -1)
                # Plain argmax steps, EOS included: generate(min_new_tokens=...) would mask EOS, which vLLM's
                # ignore_eos does not.
                for _ in range(NEW_TOKENS):
                    ids = torch.cat([ids, ckpt.model(ids).logits[:, -1:].argmax(-1)], dim=1)
            logprobs.append(lp[torch.arange(len(p) - 1), torch.tensor(p[1:])])
            greedy.append(ids[0, len(p) :].tolist())
    finally:
        if patch:
            gkf.unpatch_model(ckpt.model)
    return Reference(logprobs, greedy)


def layer0_routing(ckpt: Checkpoint) -> list[torch.Tensor]:
    """Per prompt, the experts (T, k) each token picks in :attr:`Checkpoint.first_module` (transformers model)."""
    module = ckpt.model.get_submodule(ckpt.first_module)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for p in PROMPTS:
                ckpt.model(torch.tensor([p]))
    finally:
        handle.remove()
    protos = ckpt.library.modules[ckpt.first_module].prototypes
    return [gkf.ops.arrow_route(x[0], protos, TOP_K, TEMPERATURE)[1] for x in seen]


def vllm_outputs(llm, prompts: list[list[int]]) -> Reference:
    """vLLM's prompt log-probs and greedy continuations of ``prompts``, submitted together (one batch)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    logprobs = [
        torch.tensor([o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))], dtype=torch.float64)
        for p, o in zip(prompts, outs, strict=True)
    ]
    return Reference(logprobs, [list(o.outputs[0].token_ids) for o in outs])


def shutdown(llm) -> None:
    """Stop an LLM's engine processes now (the tests never leave vLLM processes running)."""
    llm.llm_engine.engine_core.shutdown()


def assert_matches(ours: Reference, ref: Reference, atol: float, what: str) -> None:
    for i, (lp, lp_ref) in enumerate(zip(ours.logprobs, ref.logprobs, strict=True)):
        err = float((lp - lp_ref).abs().max())
        assert err <= atol, f"{what}, prompt {i}: prompt log-probs differ by {err:.3e} > {atol:.1e}"
    assert ours.greedy == ref.greedy, f"{what}: greedy tokens differ"


def max_logprob_change(a: Reference, b: Reference) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logprobs, b.logprobs, strict=True))
