"""genknowsub_fast: GenKnowSub + Arrow routed-LoRA inference at base-model speed."""

from . import ops, reference
from .ops import arrow_prototypes, arrow_route, routed_lora

__version__ = "0.1.0"
__all__ = ["ops", "reference", "arrow_prototypes", "arrow_route", "routed_lora", "__version__"]
