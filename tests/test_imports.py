"""What the package imports in a fresh interpreter: neither ``import genknowsub_fast`` nor the everyday API (a library
built from adapters, saved and loaded, a model patched, run and unpatched) imports bitsandbytes or another optional
extra. bitsandbytes prints warnings on import on some CPUs and is only needed for 4-bit bases, which the user imports
themselves; the package recognises such layers without importing it."""

import json
import subprocess
import sys

import pytest

# Optional dependencies (extras) that importing the package and resolving its public names must not load.
OPTIONAL = ("bitsandbytes", "peft", "lm_eval", "vllm", "matplotlib")


def _modules_after(code: str) -> set[str]:
    """Top-level names of the modules loaded after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_and_public_names_load_no_optional_extra():
    loaded = _modules_after("import genknowsub_fast as gkf\nfor name in gkf.__all__:\n    getattr(gkf, name)")
    assert "genknowsub_fast" in loaded and "torch" in loaded  # the names really were resolved
    assert not loaded & set(OPTIONAL), sorted(loaded & set(OPTIONAL))


@pytest.mark.slow
def test_build_patch_run_save_load_imports_no_bitsandbytes(phi3_setup, tmp_path):
    lib_path = tmp_path / "lib.safetensors"
    code = f"""
import torch
import genknowsub_fast as gkf
from genknowsub_fast import LoraLibrary, patch_model, patched, patched_layers, unpatch_model
from genknowsub_fast.synthetic import make_phi3

lib = LoraLibrary.from_adapters({[str(p) for p in phi3_setup.task]!r}, {[str(p) for p in phi3_setup.general]!r})
lib.save({str(lib_path)!r})
lib = LoraLibrary.load({str(lib_path)!r})
model = patch_model(make_phi3("tiny"), lib, top_k=2)
assert len(patched_layers(model)) == len(lib.modules)
ids = torch.tensor({phi3_setup.ids.tolist()!r})
with torch.no_grad():
    model(ids)
    model.generate(ids[:1], max_new_tokens=2, do_sample=False)
unpatch_model(model)
with patched(model, {str(lib_path)!r}), torch.no_grad():
    model(ids)
m = next(iter(lib.modules.values()))
gkf.ops.routed_lora(torch.randn(3, m.a.shape[2]), m.a, m.b, m.scaling, m.prototypes, top_k=2, temperature=1.0)
"""
    loaded = _modules_after(code)
    assert "transformers" in loaded and "safetensors" in loaded
    assert "bitsandbytes" not in loaded
