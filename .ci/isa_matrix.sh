#!/usr/bin/env bash
# The tests that run the compiled CPU kernels (routed LoRA and prototypes), once per instruction set: each ISA this
# CPU runs natively is forced for the whole pytest process with GENKNOWSUB_FAST_CPU_ISA, so the ops, the runner and
# patched models all run on that path; for the ISAs it lacks, the AVX-512 kernels run compiled against SIMDe's
# emulated intrinsics (tests/csrc/test_emulated_avx512.py; there is no emulation of AVX2 on a CPU without it). Prints
# which ISA ran natively, which emulated, and fails when any run fails, collects nothing, or skips what it must run.
#
#   bash .ci/isa_matrix.sh          # make test-isa; PY=... picks the interpreter (default .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
KERNEL_TESTS=(
    tests/csrc/test_routed_lora_cpu.py
    tests/backends/test_cpu_kernel.py
    tests/backends/test_prototype_ext.py
    tests/test_runner.py
    tests/test_ops.py
    tests/test_patching_fidelity.py
)
ISAS=(scalar avx2 avx512)
unset GENKNOWSUB_FAST_CPU_ISA

best=$("$PY" -c "from genknowsub_fast.backends import cpu_kernel; print(cpu_kernel.isa('auto'))" 2>&1 | tail -1)
case "$best" in
    scalar | avx2 | avx512) ;;
    *)
        echo "ISA matrix: the compiled extension is not loaded, so there is no CPU kernel to test: $best"
        exit 1
        ;;
esac
rank() { case "$1" in scalar) echo 0 ;; avx2) echo 1 ;; avx512) echo 2 ;; esac; }

status=0
summary=()
for isa in "${ISAS[@]}"; do
    if [[ $(rank "$isa") -gt $(rank "$best") ]]; then
        summary+=("$isa: not on this CPU")
        continue
    fi
    echo "== ISA matrix: the kernel tests with GENKNOWSUB_FAST_CPU_ISA=$isa (native)"
    ran=$(GENKNOWSUB_FAST_CPU_ISA=$isa "$PY" -c "from genknowsub_fast.backends import cpu_kernel; print(cpu_kernel.isa())")
    if [[ "$ran" != "$isa" ]]; then
        echo "GENKNOWSUB_FAST_CPU_ISA=$isa ran the kernels on '$ran'"
        status=1
    fi
    # test_routed_lora_cpu.py forces every ISA per test through its `isa` fixture: only this ISA's cases (and the
    # tests without one) run here, so no case runs three times.
    out=$(GENKNOWSUB_FAST_CPU_ISA=$isa "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}" \
        -k "$isa or not (scalar or avx2 or avx512)" 2>&1)
    rc=$?
    echo "$out" | tail -4
    summary+=("$isa: native, $(echo "$out" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//') (exit $rc)")
    [[ $rc -eq 0 ]] || status=1
done

if [[ $(rank "$best") -lt $(rank avx512) ]]; then
    echo "== ISA matrix: the AVX-512 kernels under SIMDe emulation (this CPU lacks AVX-512)"
    out=$("$PY" -m pytest -q -rs -p no:cacheprovider tests/csrc/test_emulated_avx512.py 2>&1)
    rc=$?
    echo "$out" | tail -4
    if echo "$out" | grep -q "1 passed"; then
        summary+=("avx512: emulated (SIMDe), passed")
    else
        summary+=("avx512: emulated (SIMDe), NOT passed (exit $rc; a skip means g++ or libsimde-dev is missing)")
        status=1
    fi
else
    note="make test compiles and runs it anyway: tests/csrc/test_emulated_avx512.py"
    summary+=("avx512 under SIMDe emulation: not needed, every ISA ran natively ($note)")
fi

echo "== ISA matrix on $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'):" \
    "best ISA $best"
for line in "${summary[@]}"; do echo "   $line"; done
exit "$status"
