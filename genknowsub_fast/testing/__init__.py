"""Fixtures that need no model hub: random Phi-3 / Phi-2 models, synthetic PEFT adapters with known spectra, a
word-level tokenizer and multiple-choice examples. The demo command, the tests and the benchmarks build on them; a
user's own pipeline does not need them.

Also importable as ``genknowsub_fast.synthetic`` (the name the README uses).
"""

from .adapters import SyntheticAdapters, decaying_factors, nonconvergent_spectrum, spectrum_factors, write_adapters
from .models import (
    PHI2_TARGETS,
    PHI3_SIZES,
    PHI3_TARGETS,
    check_phi3_fits,
    make_phi2,
    make_phi3,
    phi3_config,
    phi3_num_parameters,
)
from .text import CHAT_TOKENS, WORDS, make_choice_examples, make_tokenizer

__all__ = [
    "PHI2_TARGETS",
    "PHI3_SIZES",
    "PHI3_TARGETS",
    "phi3_config",
    "make_phi3",
    "make_phi2",
    "phi3_num_parameters",
    "check_phi3_fits",
    "spectrum_factors",
    "decaying_factors",
    "nonconvergent_spectrum",
    "SyntheticAdapters",
    "write_adapters",
    "WORDS",
    "CHAT_TOKENS",
    "make_tokenizer",
    "make_choice_examples",
]
