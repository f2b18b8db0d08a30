"""The package's layering rules, checked on what each module really imports (in a fresh interpreter each) and on the
import statements of the source itself:

- importing the package imports nothing heavy (no torch until a name is used);
- the library knows neither patching, analytics, the runner nor the ops;
- ops, the runner and the kernels know no models (no patching, library, transformers);
- nothing in the core imports integrations;
- no import cycle, counting imports inside functions too;
- every public name of the README resolves, and every module is placed in docs/design.md's layout;
- no text points at issue numbers or at documents the repository does not hold.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genknowsub_fast"

CORE = [
    "genknowsub_fast.experts",
    "genknowsub_fast.options",
    "genknowsub_fast.library",
    "genknowsub_fast.library.build",
    "genknowsub_fast.library.file_format",
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


def test_library_knows_neither_patching_nor_analytics_nor_the_runner():
    mods = _imported_by("genknowsub_fast.library")
    forbidden = {f"genknowsub_fast.{m}" for m in ("patching", "analytics", "runner", "ops")}
    assert not forbidden & mods
    assert "genknowsub_fast.library.build" in mods, "the check must have loaded the library"


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


# ------------------------------------------------------------------------------------------- static import graph
def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Module → package modules it imports anywhere in its source (inside functions too; ``from . import x`` counts
    as an import of ``x`` only)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                names = subs or [target]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {n for n in names if n in mods and n != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_even_inside_functions():
    graph = _import_graph()
    assert "genknowsub_fast.library.build" in graph["genknowsub_fast.library.lora_library"], "the graph must be read"
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_reads_peft_models_through_an_entry_point():
    """LoraLibrary.from_peft_model stays a public entry point without importing the PEFT integration."""
    from importlib.metadata import entry_points

    graph = _import_graph()
    assert not any(m.startswith("genknowsub_fast.integrations") for m in graph["genknowsub_fast.library.lora_library"])
    (reader,) = [ep for ep in entry_points(group="genknowsub_fast.model_readers") if ep.name == "peft"]
    assert reader.value == "genknowsub_fast.integrations.peft:library_from_peft_model"


# ------------------------------------------------------------------------------------------------- public names
PUBLIC_MODULES = [
    "genknowsub_fast.ops",
    "genknowsub_fast.options",
    "genknowsub_fast.reference",
    "genknowsub_fast.library",
    "genknowsub_fast.evaluate",
    "genknowsub_fast.analytics",
    "genknowsub_fast.synthetic",
    "genknowsub_fast.testing",
    "genknowsub_fast.integrations.peft",
    "genknowsub_fast.cli",
    "genknowsub_fast.triton_kernels",
]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_public_modules_import(module):
    import importlib

    importlib.import_module(module)


def test_public_names_resolve():
    import genknowsub_fast as gkf
    from genknowsub_fast import evaluate, synthetic, testing

    for name in gkf.__all__:
        assert getattr(gkf, name) is not None, name
    for name in evaluate.__all__:
        assert getattr(evaluate, name) is not None, name
    assert synthetic.__all__ == testing.__all__
    assert all(getattr(synthetic, n) is getattr(testing, n) for n in testing.__all__)
    assert gkf.gks is __import__("genknowsub_fast.library.gks", fromlist=["gks"])
    from genknowsub_fast.cli import main  # the console script's target (pyproject.toml)

    assert callable(main)


def test_every_module_is_placed_in_the_design_layout():
    """docs/design.md's layout section names every package module (or its folder), so a newcomer finds each one."""
    text = (ROOT / "docs" / "design.md").read_text()
    layout = text[text.index("## 2. Layout") : text.index("## 3.")]
    missing = []
    for mod, path in _modules().items():
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        name = rel.parent.name + "/" if rel.name == "__init__.py" else rel.stem
        if not re.search(rf"(?<![\w/]){re.escape(name)}", layout):
            missing.append(mod)
    assert not missing, f"modules not in docs/design.md's layout: {missing}"


# ------------------------------------------------------------------------------------------------------- text
_TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".sh", ".toml", ".cfg", ".txt", ".yaml", ".yml"}
_ISSUE_REF = re.compile(r"\b[Ii]ssues? #?\d+|\b[Ii]ssue's\b|\bthe issue (measured|says|asks)")


def _project_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if Path(f).suffix in _TEXT_SUFFIXES or f in ("Makefile", ".ci/run")]


def test_no_issue_numbers_or_missing_documents_in_the_text():
    """A reader has no issue tracker and no design card outside the repository: the text states behaviour and
    measurements instead, and cites docs/design.md."""
    offenders = []
    for path in _project_text_files():
        if not path.exists() or path == Path(__file__).resolve():  # this file spells the patterns out
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _ISSUE_REF.search(line) or "DESIGN.md" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not offenders, "\n".join(offenders[:20])


def test_issue_pattern_catches_what_it_must():
    for line in ("Issue 13 #4: x", "see issue 12.5", "the issue measured 0.2", "(issue 16)", "the issue's target"):
        assert _ISSUE_REF.search(line), line
    for line in ("no issue here", "an issue with NaN", "#include <x>"):
        assert not _ISSUE_REF.search(line), line
