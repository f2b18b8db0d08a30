"""genknowsub_fast: GenKnowSub + Arrow routed-LoRA inference at base-model speed.

import genknowsub_fast as gkf
lib = gkf.LoraLibrary.from_adapters(task_dirs, general_adapters=general_dirs, gks="param")
gkf.patch_model(model, lib, top_k=3)
"""

from . import ops, reference
from .analytics import compare_gks, library_stats, record_routing
from .library import LoraLibrary, ModuleExperts
from .ops import arrow_prototypes, arrow_route, routed_lora
from .patching import is_patched, patch_model, patched, unpatch_model

__version__ = "0.1.0"
__all__ = [
    "LoraLibrary",
    "ModuleExperts",
    "arrow_prototypes",
    "arrow_route",
    "compare_gks",
    "is_patched",
    "library_stats",
    "ops",
    "patch_model",
    "patched",
    "record_routing",
    "reference",
    "routed_lora",
    "unpatch_model",
    "__version__",
]
