"""Zero-shot multiple-choice evaluation: option scoring as the GenKnowSub paper scores it.

- :mod:`.scoring`: :func:`score_choices` (batched, shared-prefix KV cache), the naive loop, reductions, accuracy;
- :mod:`.passes`: the batched next-token NLL passes with one shared-prefix cache per example;
- :mod:`.formats`: option templates, reduction names, example checks, the lm-eval task config (no torch: the
  command line imports them).

The names of :mod:`.scoring` are available here (``genknowsub_fast.evaluate.score_choices``); importing this package
imports no torch until one of them is used. The ``eval`` command is :mod:`genknowsub_fast.cli.eval_command`.
"""

from __future__ import annotations

import importlib

SCORING_NAMES = (
    "REDUCTIONS",
    "TEMPLATES",
    "OptionTokens",
    "accuracy",
    "check_examples",
    "predictions",
    "reduce_nll",
    "resolve_template",
    "score_choices",
    "score_choices_naive",
    "tokenize_options",
)
__all__ = list(SCORING_NAMES)


def __getattr__(name: str):
    if name not in SCORING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".scoring", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
