#!/usr/bin/env bash
# GPU checks of the Triton backend, as one prepared run for a machine with one NVIDIA GPU (H100/H200) and no network.
#
#   bash benchmarks/gpu_check.sh                # from the repository root
#
# What it runs (about 6-8 minutes on an H100; stage timeouts 240 s + 300 s, so a device call with timeout_s=600 always
# returns the outputs):
#   1. the GPU tests: python -m pytest tests -m gpu (Triton kernels vs the float64 reference in bf16/fp16/fp32 with
#      tests/tolerances.py, CUDA-graph capture, torch.compile, no host sync, offsets past 2^31 elements, end-to-end
#      patched Phi-3 with backend="triton" vs backend="torch");
#   2. the AOT compile + ptxas -v spill check of every dispatch-table configuration (sm_80, sm_90, plus the --extra
#      edge/forced-regime set), in the background while stage 1 runs (it needs CPUs only);
#   3. the GPU benchmarks, benchmarks/test_bench_triton.py (op level at Phi-3-mini shapes, bf16, E=10 r=4 and E=64 r=8,
#      k=3, T in {1, 16, 256, 4096}: base / PEFT / torch backend / Triton, CUDA graphs at T=1; model level: random
#      Phi-3-mini, 32 layers, prefill 512 and decode 32: base / PEFT / patched) with a pytest-benchmark JSON;
#   4. benchmarks/write_results.py on that JSON -> RESULTS_gpu.md (ratios measured side by side, device name).
#
# Outputs go to $OUT when set (the device tool brings that folder back), else to benchmarks/results/gpu/:
#   gpu_check.log (everything), gpu_tests.xml (JUnit), aot.txt + aot.json, bench_gpu.json, RESULTS_gpu.md.
#
# Nothing is installed from the network. The machine's python3 must have torch (CUDA), triton, transformers, peft
# (>= 0.17: ArrowConfig / create_arrow_model), pytest and pytest-benchmark; the device image has all of them (check
# peft's version in the log's first lines). A missing or too-old package travels as wheels in .whl/ (carry ".whl";
# see /work/.library/device/README.md): every .whl/*.whl is installed into /tmp/site first. Only the working tree
# is needed otherwise: do NOT carry .venv (a CPU build of torch for another Python).
# The package is installed editable without dependencies and without the C++/CUDA extension (set
# GKF_GPU_CHECK_EXTENSION=on to build it as well: several minutes of nvcc). GKF_GPU_CHECK_STAGES="tests aot bench"
# picks stages (default: all three; "results" always runs when bench_gpu.json exists).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
STAGES="${GKF_GPU_CHECK_STAGES:-tests aot bench}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
: >"$LOG"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing carried wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$LOG"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

say "environment"
{
    nvidia-smi -L || true
    "$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "peft", "pytest", "pytest_benchmark"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} MISSING ({exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    from peft import ArrowConfig, create_arrow_model  # noqa: F401
    print("peft Arrow: available")
except ImportError as exc:
    print(f"peft Arrow: MISSING ({exc}): carry a peft>=0.17 wheel in .whl/")
EOF
} 2>&1 | tee -a "$LOG"

ext="${GKF_GPU_CHECK_EXTENSION:-off}"
if [[ -z "${GKF_GPU_CHECK_SKIP_INSTALL:-}" ]]; then  # set it where the package is installed already (a dry run here)
    say "installing genknowsub_fast (editable, no deps, no network)"
    GENKNOWSUB_FAST_EXTENSION="$ext" "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
        2>&1 | tail -5 | tee -a "$LOG"
fi
export GENKNOWSUB_FAST_EXTENSION="$ext"
check_import() {
    "$PY" -c "import genknowsub_fast.triton_kernels.custom_ops, genknowsub_fast as g; print('import ok', g.__file__)" \
        2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}
if ! check_import; then
    # Fallback without pip: the source tree itself on PYTHONPATH, with triton_kernels/ linked where it installs.
    say "pip install failed: running from the source tree (genknowsub_fast/triton_kernels -> ../triton_kernels)"
    [[ -e genknowsub_fast/triton_kernels ]] || ln -s ../triton_kernels genknowsub_fast/triton_kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    check_import || { say "FATAL: the package does not import"; exit 1; }
fi

status=0
aot_pid=""
if has aot; then
    say "AOT compile + ptxas spill check (background, CPU only)"
    (env -u TRITON_INTERPRET timeout 220 "$PY" -m genknowsub_fast.triton_kernels.aot --arch 80 90 --extra --jobs 8 \
        --json "$OUT_DIR/aot.json" >"$OUT_DIR/aot.txt" 2>&1; echo "aot exit code $?" >>"$OUT_DIR/aot.txt") &
    aot_pid=$!
fi

if has tests; then
    say "GPU tests: pytest tests -m gpu"
    xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)  # parallel Triton JIT compiles; one GPU is enough
    timeout 240 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider "${xdist[@]}" --junitxml="$OUT_DIR/gpu_tests.xml" \
        -o junit_family=xunit1 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "GPU tests exit code $rc"
    [[ $rc -eq 0 ]] || status=1
fi

if [[ -n "$aot_pid" ]]; then
    wait "$aot_pid"
    # The summary lines: failures (ERROR/SPILL) and the last lines (exit code).
    { grep -E "ERROR|SPILL" "$OUT_DIR/aot.txt" | head -40; tail -3 "$OUT_DIR/aot.txt"; } | tee -a "$LOG"
    "$PY" - "$OUT_DIR/aot.json" <<'EOF' 2>&1 | tee -a "$LOG"
import collections, json, sys
try:
    res = json.load(open(sys.argv[1]))
except OSError as exc:
    sys.exit(f"no AOT results: {exc}")
by = collections.defaultdict(list)
for r in res:
    by[(r["arch"], r["problem"], r["kernel"])].append(r)
for (arch, prob, kernel), rs in sorted(by.items()):
    regs = [r["registers"] for r in rs if r["registers"] > 0]
    spills = sum(1 for r in rs if r["spill_stores"] > 0 or r["spill_loads"] > 0)
    errors = sum(1 for r in rs if r["error"])
    span = f"{min(regs)}-{max(regs)}" if regs else "n/a"
    spilled = spills if regs else "n/a"  # forced-regime configs get no ptxas -v pass unless --ptxas-edge
    print(f"sm_{arch} {prob:5s} {kernel:26s} configs={len(rs):3d} regs={span:8s} spilling={spilled} errors={errors}")
EOF
    grep -q "aot exit code 0" "$OUT_DIR/aot.txt" || status=1
fi

if has bench; then
    say "GPU benchmarks: benchmarks/test_bench_triton.py"
    timeout 300 "$PY" -m pytest benchmarks/test_bench_triton.py -q -p no:cacheprovider --benchmark-only \
        --benchmark-json="$OUT_DIR/bench_gpu.json" --benchmark-columns=median,iqr,rounds 2>&1 | tee -a "$LOG" | tail -40
    rc=${PIPESTATUS[0]}
    say "GPU benchmarks exit code $rc"
    [[ $rc -eq 0 ]] || status=1
fi

if [[ -f "$OUT_DIR/bench_gpu.json" ]]; then
    say "write_results.py -> $OUT_DIR/RESULTS_gpu.md"
    "$PY" benchmarks/write_results.py "$OUT_DIR/bench_gpu.json" -o "$OUT_DIR/RESULTS_gpu.md" \
        --command "bash benchmarks/gpu_check.sh" 2>&1 | tee -a "$LOG"
    grep -E "missed|met" "$OUT_DIR/RESULTS_gpu.md" | tee -a "$LOG" || true
fi
say "done (status $status); outputs in $OUT_DIR"
exit "$status"
