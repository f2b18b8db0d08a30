"""The package's layering rules, checked on what each module really imports (in a fresh interpreter each):

- importing the package imports nothing heavy (no torch until a name is used);
- the library knows neither patching nor analytics;
- ops, the runner and the kernels know no models (no patching, library, transformers);
- nothing in the core imports integrations.
"""

import json
import subprocess
import sys

CORE = [
    "genknowsub_fast.experts",
    "genknowsub_fast.gks",
    "genknowsub_fast.layer_prototypes",
    "genknowsub_fast.adapters",
    "genknowsub_fast.library",
    "genknowsub_fast.runner",
    "genknowsub_fast.ops",
    "genknowsub_fast.patching",
    "genknowsub_fast.reference",
    "genknowsub_fast.backends.torch_ops",
    "genknowsub_fast.backends.cpu_kernel",
    "genknowsub_fast.backends.packing",
]


def _imported_by(*modules: str) -> set[str]:
    """Every module loaded after importing ``modules`` into a fresh interpreter (a union: if one of them pulled in a
    forbidden module, the union has it)."""
    code = (
        f"import sys, json, importlib; [importlib.import_module(m) for m in {list(modules)!r}]; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_package_import_is_lazy():
    mods = _imported_by("genknowsub_fast")
    assert "torch" not in mods
    assert not {m for m in mods if m.startswith("genknowsub_fast.")} - {"genknowsub_fast._version"}


def test_library_knows_neither_patching_nor_analytics():
    mods = _imported_by("genknowsub_fast.library")
    assert not {"genknowsub_fast.patching", "genknowsub_fast.analytics", "genknowsub_fast.runner"} & mods


def test_ops_and_kernels_know_no_models():
    mods = _imported_by(
        "genknowsub_fast.ops",
        "genknowsub_fast.runner",
        "genknowsub_fast.backends.torch_ops",
        "genknowsub_fast.backends.cpu_kernel",
    )
    assert not {"genknowsub_fast.patching", "genknowsub_fast.library", "transformers", "peft"} & mods


def test_core_does_not_import_integrations():
    mods = _imported_by(*CORE)
    assert not any(m.startswith("genknowsub_fast.integrations") for m in mods)
    assert "genknowsub_fast.ops" in mods and "genknowsub_fast.patching" in mods, "the check must have loaded the core"
