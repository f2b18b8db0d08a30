"""Building, saving and loading a library of Arrow-routed LoRA experts.

- :mod:`.lora_library`: :class:`LoraLibrary`, the public object;
- :mod:`.adapters`: reading PEFT adapter directories;
- :mod:`.gks`: the GenKnowSub maths on one module's factors;
- :mod:`.layer_prototypes`: per-decoder-layer prototypes (``prototype_scope="layer"``);
- :mod:`.build`: from adapters to a library's modules (GenKnowSub per module, padding, prototypes);
- :mod:`.file_format` and :mod:`.file_checks`: the safetensors file and what it must hold;
- :mod:`.base_model`: which base model adapters and libraries name.
"""

from .base_model import model_family
from .file_format import FORMAT_VERSION
from .gks import GKS_MODES
from .lora_library import LoraLibrary

__all__ = ["LoraLibrary", "model_family", "FORMAT_VERSION", "GKS_MODES"]
