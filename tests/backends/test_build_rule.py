"""The build rule (backends/build_rule.py): one build for every x86-64 CPU, the vector code only in target regions."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from genknowsub_fast.backends import build_rule, extension
from tests.extension_required import require_op

# Namespaces of the target regions (csrc/cpu_target.h) and the functions that hand out their kernel tables.
REGION = re.compile(r"::avx2::|::avx512::|kernels_avx2\(\)|kernels_avx512\(\)")


def test_switch_parsing():
    assert build_rule.extension_disabled({build_rule.EXTENSION_SWITCH: " Off "})
    assert build_rule.extension_disabled({build_rule.EXTENSION_SWITCH: "0"})
    assert not build_rule.extension_disabled({build_rule.EXTENSION_SWITCH: "on"})
    assert not build_rule.extension_disabled({})


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to disassemble the extension")
def test_ymm_and_zmm_registers_only_inside_target_regions():
    """A function outside the AVX2 / AVX-512 regions that uses 256- or 512-bit registers would crash (illegal
    instruction) on a CPU without them: the whole build must be baseline x86-64 but for the run-time-dispatched
    kernels."""
    require_op("routed_lora_delta_")
    lib = extension.library_path()
    assert lib is not None
    text = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True, check=True
    ).stdout
    offenders, in_region, wide, name = [], {}, False, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            if name is not None and wide:
                in_region[name] = bool(REGION.search(name))
            name, wide = head.group(1), False
        elif "%ymm" in line or "%zmm" in line:
            wide = True
    if name is not None and wide:
        in_region[name] = bool(REGION.search(name))
    offenders = [n for n, ok in in_region.items() if not ok]
    assert any(in_region.values()), "no vector kernels found: the disassembly did not parse"
    assert not offenders, f"{len(offenders)} functions outside the target regions use ymm/zmm: {offenders[:5]}"
