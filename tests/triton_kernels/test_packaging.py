"""A built wheel installs the Triton kernels as ``genknowsub_fast.triton_kernels`` (a PyPI distribution owns the
top-level name ``triton_kernels``) and leaves the developer tools (``tools/``, pinned to the GPU image's Triton) out;
the package imports from the wheel's files alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _source_copy(dest: Path) -> Path:
    """The checkout's tracked files (git), or its sources without build outputs: a build in the working tree would
    reuse a stale build/ folder, whose deleted files a wheel would still ship."""
    try:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True)
        names = files.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        names = []
    if not names:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".venv*", "build", "*.egg-info", "*.so", ".git"))
        return dest
    for name in names:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp_path_factory.mktemp("src"))
    env = {**os.environ, "GENKNOWSUB_FAST_EXTENSION": "off", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (whl,) = out.glob("genknowsub_fast-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_the_kernels_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    kernels = {n for n in names if n.startswith("genknowsub_fast/triton_kernels/")}
    sources = {p.name for p in (REPO / "triton_kernels").glob("*.py")}
    assert {Path(n).name for n in kernels} >= sources, sources - {Path(n).name for n in kernels}
    assert not any(n.startswith(("triton_kernels/", "tools/")) for n in names)
    assert not any("aot" in Path(n).name for n in kernels), "the AOT tool is a developer tool, not shipped"


@pytest.mark.slow
def test_wheel_imports_genknowsub_fast_triton_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import genknowsub_fast.triton_kernels as k, genknowsub_fast.triton_kernels.dispatch as d; "
        "print(k.__file__); print(d.plan_for.__module__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    where, module = proc.stdout.split()
    assert Path(where).resolve().is_relative_to(site.resolve()) and module == "genknowsub_fast.triton_kernels.dispatch"
    first = (site / "genknowsub_fast" / "triton_kernels" / "__init__.py").read_text().splitlines()[0]
    assert first.startswith("#") and "PyPI" in first, "the first line says why the kernels install inside the package"
