"""Fixtures that need no model hub: random Phi-3 / Phi-2 models, synthetic PEFT adapters with known spectra, a
word-level tokenizer and multiple-choice examples. The demo command, the tests and the benchmarks build on them; a
user's own pipeline does not need them.

Also importable as ``genknowsub_fast.synthetic`` (the name the README uses).
"""

from . import adapters, models, text
from .adapters import *  # noqa: F403
from .models import *  # noqa: F403
from .text import *  # noqa: F403

__all__ = [*models.__all__, *adapters.__all__, *text.__all__]
