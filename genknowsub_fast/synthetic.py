"""The test fixtures under the name the README uses: everything in :mod:`genknowsub_fast.testing` (random models,
synthetic adapters, a word-level tokenizer, multiple-choice examples)."""

from .testing import *  # noqa: F403
from .testing import __all__  # noqa: F401
