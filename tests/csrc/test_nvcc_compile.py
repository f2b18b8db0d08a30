"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90, and ptxas reports no spills (a compile check: no GPU)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARCHS = (80, 90)
CU_FILES = sorted(CSRC.glob("*.cu"))


@pytest.fixture(scope="module")
def nvcc():
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc not found on PATH: the CUDA sources are not compile-checked here")
    return path


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/ has no .cu files"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_compiles_without_spills(nvcc, src, arch, tmp_path):
    cmd = [nvcc, "-c", "-O3", f"-arch=sm_{arch}", "--resource-usage", f"-I{CSRC}", str(src)]
    proc = subprocess.run([*cmd, "-o", str(tmp_path / "out.o")], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed for {src.name} sm_{arch}:\n{log[-4000:]}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills, f"no ptxas resource report for {src.name} sm_{arch}:\n{log[-2000:]}"
    assert max(spills) == 0, f"{src.name} sm_{arch} spills registers:\n{log[-2000:]}"
