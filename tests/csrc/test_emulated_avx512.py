"""The AVX-512 kernels (csrc/routed_lora_isa_avx512.cpp) on a CPU without AVX-512: compiled against SIMDe's portable
intrinsics (Debian package libsimde-dev) and compared with the scalar kernels on random problems in every dtype.

Where the CPU has AVX-512, test_routed_lora_cpu.py runs these kernels natively against the float64 reference; this
test is for machines without it, and is skipped where the SIMDe headers or a compiler are missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.tolerances import ATOL

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "emulated"
SIMDE = Path("/usr/include/simde/x86/avx512.h")


@pytest.mark.slow
@pytest.mark.skipif(not SIMDE.exists() or shutil.which("g++") is None, reason="needs g++ and libsimde-dev")
def test_avx512_kernels_agree_with_scalar_under_emulation(tmp_path):
    csrc = ROOT / "csrc"
    common = ["g++", "-std=c++17", "-O1", "-mf16c", f"-I{csrc}"]
    emulated = tmp_path / "avx512.o"
    subprocess.run(
        common + ["-DGKF_EMULATED_INTRINSICS", "-include", str(HERE / "simde_avx512_shim.h"), "-c",
                  str(csrc / "routed_lora_isa_avx512.cpp"), "-o", str(emulated)],
        check=True, capture_output=True,
    )  # fmt: skip
    exe = tmp_path / "compare"
    sources = [HERE / "compare_isa.cpp", csrc / "routed_lora_isa_scalar.cpp", emulated]
    subprocess.run(common + [str(p) for p in sources] + ["-o", str(exe)], check=True, capture_output=True)
    tols = [str(ATOL[d]) for d in (torch.float32, torch.bfloat16, torch.float16)]
    proc = subprocess.run([str(exe), *tols], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "324 cases, 0 mismatches" in proc.stdout
