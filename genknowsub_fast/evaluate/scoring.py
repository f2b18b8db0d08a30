"""Zero-shot multiple-choice scoring as the GenKnowSub paper scores it, batched and with a shared-prefix KV cache.

Every option of an example is formatted with a template (``"{context}{choice}"``, or the Phi-3 chat template the
original Modular-LLM code uses), tokenized whole, and scored by the negative log-likelihood (NLL) of its tokens
under the model; the option with the lowest score wins. Reductions of the per-token NLLs (every one: lower is
better):

``"mean"``
    The original code's score: the token NLLs of the WHOLE formatted sequence, tokenized with the tokenizer's
    default special tokens (a BOS is part of the sequence when the tokenizer adds one), every token except the
    first (it has no prediction), summed and divided by the number of those tokens whose NLL is not exactly 0
    (the original divides by its count of non-zero losses, meant to skip ignored positions; one forward per
    option, so there is no padding). The original also truncates sequences at 512 tokens; this does not.
``"sum_continuation"``
    The NLL of the continuation alone (lm-eval's ``acc``: the argmax of the log-likelihood).
``"mean_continuation"``
    That sum divided by the number of continuation tokens.
``"per_char_continuation"``
    That sum divided by the number of characters of the choice string (lm-eval's ``acc_norm``, which divides by
    ``len(choice)`` without the target delimiter).
``"per_byte_continuation"``
    That sum divided by the UTF-8 bytes of the choice string (lm-eval's ``acc_bytes``).

The continuation is what the template puts from ``{choice}`` on (the choice and the rest of the template). Its
tokens are the formatted option's tokens after their longest common prefix with the tokenization of the text
before ``{choice}``: exactly lm-eval's split (``whole[len(encode(context)):]``) when no token merges across the
boundary, and, when one does, the merged token counts as continuation (lm-eval would then drop its first part).

Speed: the options of an example share their leading tokens. :func:`score_choices` runs that longest common token
prefix of the options' full tokenizations once per example, keeps its KV cache, and runs only each option's
remaining tokens on it, batched across examples and options. Each option is still tokenized whole, exactly as the
naive loop tokenizes it, so a merge across the context/choice boundary changes nothing. Attention is causal and
Arrow routes every token on its own hidden state, so the prefix's hidden states, routing and cache are the same
whichever option follows: the scores equal the naive loop's up to float rounding (checked by the tests against a
float64 run within the tolerance table).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import SCORING_NAMES
from .formats import REDUCTIONS, TEMPLATES, check_examples, resolve_template  # noqa: F401 (re-exported)
from .passes import next_token_nlls

__all__ = list(SCORING_NAMES)  # the package re-exports exactly these


@dataclass
class OptionTokens:
    """One formatted option: its token ids, where its continuation starts, and the choice's length."""

    ids: list[int]
    continuation_start: int  # index of the first continuation token, >= 1
    choice_chars: int
    choice_bytes: int


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_options(tokenizer, examples: Sequence[Mapping], template: str) -> list[list[OptionTokens]]:
    """Tokenize every formatted option whole (with the tokenizer's default special tokens, as the original does)."""
    text = resolve_template(template)
    head, tail = text.split("{choice}")
    texts, heads = [], []
    for ex in examples:
        # str.replace, not str.format: contexts and choices may hold braces.
        h = head.replace("{context}", ex["context"])
        heads.append(h)
        texts.extend(h + c + tail for c in ex["choices"])
    ids = tokenizer(texts)["input_ids"] if texts else []
    head_ids = tokenizer(heads)["input_ids"] if heads else []
    out, k = [], 0
    for i, ex in enumerate(examples):
        opts = []
        for j, choice in enumerate(ex["choices"]):
            seq = list(ids[k])
            k += 1
            if len(seq) < 2:
                raise ValueError(f"example {i} choice {j}: the formatted option is {len(seq)} token(s); need >= 2")
            start = max(1, _common_prefix(seq, head_ids[i]))
            opts.append(OptionTokens(seq, start, len(choice), len(choice.encode("utf-8"))))
        out.append(opts)
    return out


def reduce_nll(nll: torch.Tensor, option: OptionTokens, reduction: str) -> float:
    """One option's score from its per-token NLLs (``nll[t-1]`` is the NLL of token ``t``, t = 1..n-1)."""
    nll = nll.double()
    if reduction == "mean":
        nonzero = int((nll != 0).sum())
        return float(nll.sum()) / max(nonzero, 1)
    cont = nll[option.continuation_start - 1 :]
    total = float(cont.sum())
    if reduction == "sum_continuation":
        return total
    if reduction == "mean_continuation":
        return total / cont.numel()
    if reduction == "per_char_continuation":
        return total / option.choice_chars
    if reduction == "per_byte_continuation":
        return total / option.choice_bytes
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def _prepare(model, tokenizer, examples, template, reduction) -> list[list[OptionTokens]]:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if not callable(tokenizer):
        raise ValueError(f"tokenizer must be a callable HF tokenizer, got {type(tokenizer).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a HF causal LM), got {type(model).__name__}")
    check_examples(examples)
    if reduction in ("per_char_continuation", "per_byte_continuation"):
        for i, ex in enumerate(examples):
            if any(not c for c in ex["choices"]):
                raise ValueError(f"example {i}: an empty choice string cannot be length-normalised ({reduction})")
    plans = tokenize_options(tokenizer, examples, template)
    if reduction != "mean":
        for i, opts in enumerate(plans):
            for j, o in enumerate(opts):
                if o.continuation_start >= len(o.ids):
                    raise ValueError(f"example {i} choice {j}: no continuation token to score ({reduction})")
    if model.training:
        raise ValueError("the model is in training mode (dropout would perturb the scores); call model.eval() first")
    return plans


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def score_choices(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping],
    *,
    template: str = "{context}{choice}",
    reduction: str = "mean",
    batch_size: int = 16,
    progress: bool | None = None,
) -> list[list[float]]:
    """Score every option of every example; returns each option's NLL score (lower is better).

    Args:
        model: a HF causal LM (patched with :func:`genknowsub_fast.patch_model` or not), in eval mode.
        tokenizer: its HF tokenizer; each formatted option is tokenized whole with the default special tokens.
        examples: dicts with ``"context"`` (str), ``"choices"`` (non-empty list of str) and optionally ``"label"``.
        template: a name in :data:`TEMPLATES` or a string with one ``{context}`` before one ``{choice}``.
        reduction: one of :data:`REDUCTIONS` (see the module docstring); ``"mean"`` is the original's score.
        batch_size: options per forward pass (the shared prefixes of up to that many examples run together).
        progress: a tqdm bar over the examples (default: when stderr is a terminal).

    Each example's longest common token prefix runs once and its KV cache serves all its options (exact: see the
    module docstring). Bad input raises ValueError before any model work.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    plans = _prepare(model, tokenizer, examples, template, reduction)
    nlls = next_token_nlls(
        model, [[o.ids for o in opts] for opts in plans], _pad_id(tokenizer), batch_size, _show_progress(progress)
    )
    return [[reduce_nll(n, o, reduction) for n, o in zip(ns, opts)] for ns, opts in zip(nlls, plans)]


def score_choices_naive(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping],
    *,
    template: str = "{context}{choice}",
    reduction: str = "mean",
    progress: bool | None = None,
) -> list[list[float]]:
    """The original's loop: one forward pass per option over its whole sequence, no batching, no cache.

    Same tokenization and reductions as :func:`score_choices`; the reference its tests and benchmark compare with.
    """
    from tqdm import tqdm

    plans = _prepare(model, tokenizer, examples, template, reduction)
    device = _device(model)
    out = []
    with torch.inference_mode():
        for opts in tqdm(plans, desc="scoring (naive)", unit="example", disable=not _show_progress(progress)):
            row = []
            for o in opts:
                ids = torch.tensor([o.ids], device=device)
                logits = model(input_ids=ids).logits[0, :-1].float()
                nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
                row.append(reduce_nll(nll.cpu(), o, reduction))
            out.append(row)
    return out


def predictions(scores: Sequence[Sequence[float]]) -> list[int]:
    """The index of each example's lowest score (the first one on ties)."""
    return [min(range(len(s)), key=lambda j, s=s: (s[j], j)) for s in scores]


def accuracy(scores: Sequence[Sequence[float]], labels: Sequence[int] | Sequence[Mapping]) -> float:
    """Fraction of examples whose lowest-scoring option is the label.

    Args:
        scores: from :func:`score_choices`.
        labels: the gold option indices, or the examples themselves (their ``"label"`` is used).
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} score rows for {len(labels)} labels")
    if not scores:
        raise ValueError("no examples to score")
    gold = [lab["label"] if isinstance(lab, Mapping) else lab for lab in labels]
    for i, (g, s) in enumerate(zip(gold, scores)):
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(s):
            raise ValueError(f"example {i}: label {g!r} is not an index into its {len(s)} scores")
    return sum(p == g for p, g in zip(predictions(scores), gold)) / len(gold)


def _pad_id(tokenizer) -> int:
    # Padded positions are masked out; any valid id will do.
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
