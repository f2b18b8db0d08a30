"""Random models and synthetic PEFT adapters for the demo, the tests and the benchmarks (no model hub needed).

Task adapters are built as ``residual + mean(general)``, where each residual has a decaying spectrum
(σ_j = σ_1 · decay^j). GenKnowSub (``gks="param"``) then recovers the residuals, whose top singular value stands well
apart from the next, so PEFT's 15-step power iteration converges (error ≈ decay^30) and its prototypes can serve as
an oracle for the exact ones.

``spectrum=`` gives every residual a chosen spectrum instead; :func:`nonconvergent_spectrum` makes one whose top two
singular values are so close (σ2/σ1 = ratio ≥ 0.95) that PEFT's 15 steps do not converge. The residual of module m is
``B = U diag(√σ)``, ``A = diag(√σ) Vᵀ`` with random orthonormal U, V, so its exact prototype is ``±V[:, 0]``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

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
    built when that is more memory than this process has left (see :func:`genknowsub_fast.memory.available_bytes`)."""
    from .memory import available_bytes, human_bytes

    n = phi3_num_parameters(size)
    need = copies * n * torch.empty(0, dtype=dtype).element_size()
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    what = f"random Phi-3 '{size}': {count} parameters, {human_bytes(need)} in {str(dtype).split('.')[-1]}"
    what += f" for {copies} copies" if copies > 1 else ""
    free = available_bytes()
    if free is not None and need > free:
        raise ValueError(f"{what}, but only {human_bytes(free)} of memory is available; choose a smaller size")
    return what


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


def spectrum_factors(
    d_in: int, d_out: int, sigma: Sequence[float], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors A (r, d_in), B (d_out, r), r = len(sigma), with ``B·A`` of singular values ``sigma`` (given in
    decreasing order): ``A = diag(√σ) Vᵀ``, ``B = U diag(√σ)`` for random orthonormal U, V (float32)."""
    sig = torch.as_tensor(list(sigma), dtype=torch.float64)
    if sig.dim() != 1 or not bool((sig > 0).all()) or not bool((sig[1:] <= sig[:-1]).all()):
        raise ValueError(f"sigma must be positive and non-increasing, got {list(sigma)}")
    rank = sig.numel()
    qa, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=gen, dtype=torch.float64))
    # Split σ evenly between the factors so neither is tiny.
    a = sig.sqrt()[:, None] * qa.T
    b = qb * sig.sqrt()[None, :]
    return a.float(), b.float()


def decaying_factors(
    d_in: int, d_out: int, rank: int, sigma1: float, decay: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors A (r, d_in), B (d_out, r) with ``B·A`` of singular values ``sigma1 · decay^j``."""
    return spectrum_factors(d_in, d_out, (sigma1 * decay ** torch.arange(rank, dtype=torch.float64)).tolist(), gen)


def nonconvergent_spectrum(ratio: float, rank: int = 4) -> tuple[float, ...]:
    """Singular values ``(1, ratio, ratio/2, ratio/4, ...)``: σ2/σ1 = ratio (< 1, so the top vector is unique).

    PEFT's prototype is 15 steps of power iteration, whose error shrinks like ``ratio^30``: with ratio ≥ 0.95 it has
    not converged (measured min |cos| to the exact prototype 0.03-0.3 on tiny GPT-2 and Phi-3 models).
    """
    if not 0 < ratio < 1 or rank < 2:
        raise ValueError(f"ratio must be in (0, 1) and rank >= 2, got ratio={ratio}, rank={rank}")
    return (1.0, ratio) + tuple(ratio / 2**j for j in range(1, rank - 1))


@dataclass
class SyntheticAdapters:
    """Paths of the adapters written by :func:`write_adapters`."""

    task: list[str]
    general: list[str]


def write_adapters(
    base_model: nn.Module,
    out_dir: str | os.PathLike,
    num_tasks: int,
    num_general: int,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] = PHI3_TARGETS,
    seed: int = 0,
    decay: float = 0.5,
    sigma1: float = 0.5,
    general_std: float = 0.05,
    task_ranks: Sequence[int] | None = None,
    spectrum: Sequence[float] | None = None,
) -> SyntheticAdapters:
    """Write task and general LoRA adapters for ``base_model`` in PEFT's format.

    The adapters are made with ``peft.get_peft_model(..., LoraConfig(init_lora_weights=False))`` on a copy of the
    model and saved with ``save_pretrained``; their weights are set as described in the module docstring. With
    ``task_ranks`` each task adapter gets its own rank (for ``gks="delta"``; residual = the task adapter then).
    ``spectrum`` (length ``rank``) gives every task residual these singular values instead of the decaying ones.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = os.fspath(out_dir)
    gen = torch.Generator().manual_seed(seed)
    ranks_t = list(task_ranks) if task_ranks is not None else [rank] * num_tasks
    if len(ranks_t) != num_tasks:
        raise ValueError(f"{len(ranks_t)} task ranks for {num_tasks} task adapters")
    if spectrum is not None and (len(spectrum) != rank or task_ranks is not None):
        raise ValueError(f"spectrum needs one value per rank ({rank}) and no task_ranks, got {list(spectrum)}")

    def lora_layers(peft_model) -> dict[str, nn.Module]:
        return {
            n.removeprefix("base_model.model."): m
            for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
        }

    peft_models: dict[int, nn.Module] = {}

    def model_for(r: int):
        if r not in peft_models:
            cfg = LoraConfig(
                r=r,
                lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
                target_modules=list(target_modules),
                init_lora_weights=False,
                lora_dropout=0.0,
            )
            with warnings.catch_warnings():
                # PEFT reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning from transformers
                # 5.x): nothing the caller can act on.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                peft_models[r] = get_peft_model(copy.deepcopy(base_model), cfg)
        return peft_models[r]

    general_factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    paths = SyntheticAdapters([], [])
    for g in range(num_general):
        pm = model_for(rank)
        facs = {}
        for path, layer in lora_layers(pm).items():
            a = torch.randn(layer.lora_A["default"].weight.shape, generator=gen) * general_std
            b = torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * general_std
            facs[path] = (a, b)
        general_factors.append(facs)
        paths.general.append(_save(pm, facs, os.path.join(out_dir, f"general_{g}")))
    for t in range(num_tasks):
        r = ranks_t[t]
        pm = model_for(r)
        facs = {}
        for path, layer in lora_layers(pm).items():
            d_out, d_in = layer.lora_B["default"].weight.shape[0], layer.lora_A["default"].weight.shape[1]
            if spectrum is not None:
                a, b = spectrum_factors(d_in, d_out, spectrum, gen)
            else:
                a, b = decaying_factors(d_in, d_out, r, sigma1 * (1 + 0.1 * t), decay, gen)
            if general_factors and r == rank:
                a = a + sum(f[path][0] for f in general_factors) / len(general_factors)
                b = b + sum(f[path][1] for f in general_factors) / len(general_factors)
            facs[path] = (a, b)
        paths.task.append(_save(pm, facs, os.path.join(out_dir, f"task_{t}")))
    return paths


def _save(peft_model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str) -> str:
    with torch.no_grad():
        for name, m in peft_model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in factors:
                m.lora_A["default"].weight.copy_(factors[key][0])
                m.lora_B["default"].weight.copy_(factors[key][1])
    peft_model.save_pretrained(path)
    return path


# A small closed vocabulary for synthetic text: the tokenizer below is trained on it and the multiple-choice examples
# are drawn from it, so every word tokenizes into a few known pieces.
WORDS = (
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "fish",
    "whale",
    "sat",
    "ran",
    "swam",
    "flew",
    "on",
    "in",
    "under",
    "over",
    "park",
    "mat",
    "river",
    "tree",
    "house",
    "stone",
    "which",
    "animal",
    "is",
    "largest",
    "smallest",
    "blue",
    "red",
    "green",
    "big",
    "small",
    "true",
    "false",
    "yes",
    "no",
    "question",
    "answer",
    "because",
    "it",
    "they",
    "water",
    "land",
)
CHAT_TOKENS = ("<|user|>", "<|end|>", "<|assistant|>")


def make_tokenizer(vocab_size: int = 128, add_bos: bool = True, seed: int = 0):
    """A sentencepiece-style BPE tokenizer (``▁`` word marks, like Phi-3's) trained on :data:`WORDS`.

    Built with the ``tokenizers`` package, no download. Specials: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3
    (the ids :func:`make_phi3` configures) and Phi-3's chat tokens. With ``add_bos`` every encoding starts with
    ``<s>``. Returns a ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` writes a loadable directory).
    """
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *CHAT_TOKENS]
    rng = random.Random(seed)
    corpus = [" ".join(rng.choices(WORDS, k=12)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(WORDS)) | set("▁.,?!'-:;()0123456789\n"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(CHAT_TOKENS),
    )


def make_choice_examples(
    n: int, num_choices: int = 4, seed: int = 0, context_words: tuple[int, int] = (8, 24)
) -> list[dict]:
    """``n`` random multiple-choice examples ``{"context", "choices", "label"}`` over :data:`WORDS`.

    Choices start with a space (the word boundary belongs to the continuation, as in lm-eval) and hold 1-4 words.
    """
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        context = "question: " + " ".join(rng.choices(WORDS, k=rng.randint(*context_words))) + " answer:"
        choices = [" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(num_choices)]
        out.append({"context": context, "choices": choices, "label": rng.randrange(num_choices)})
    return out
