"""Library files in format version 1, as the package wrote them before version 2 (five plain tensors per module:
A, B, scaling, prototypes in the library's dtype, ranks), so that the tests can check that such files still load."""

from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from genknowsub_fast.library.lora_library import library_metadata


def write_format_1(lib, path: str | os.PathLike) -> None:
    """Write ``lib`` as a version 1 file (B recovered from packed experts; prototypes in the library's dtype)."""
    tensors = {}
    for p, m in lib.modules.items():
        tensors[f"{p}/A"] = m.a
        tensors[f"{p}/B"] = m.b
        tensors[f"{p}/scaling"] = m.scaling
        tensors[f"{p}/prototypes"] = m.prototypes.to(m.a.dtype)
        tensors[f"{p}/ranks"] = m.ranks
    meta = library_metadata(
        lib.expert_names, lib.gks, lib.general_names, lib.base_model_class, lib.prototype_method, lib.routing,
        lib.base_model_name, lib.added_names, lib.prototype_scope, list(lib.modules),
    )  # fmt: skip
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, os.fspath(path), metadata={"genknowsub_fast": json.dumps({"format_version": 1, **meta})})


__all__ = ["write_format_1"]
