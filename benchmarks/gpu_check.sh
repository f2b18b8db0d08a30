#!/usr/bin/env bash
# GPU checks of the Triton backend and the CUDA prototype kernel, as one prepared run for a machine with one NVIDIA
# GPU (H100/H200) and no network. The stage timeouts add up to under 5 minutes (10 + 15 + 110 + 20 + 100 + 30 + 5 s),
# so a caller with a 7-minute limit always gets the outputs back:
#
#   bash benchmarks/gpu_check.sh            # from anywhere; it works in the repository root
#
# Stages (each under `timeout -s INT`, so pytest still writes its JUnit XML and the benchmark its JSON when a stage
# runs long; every pytest test also has its own timeout, and every test name is logged as it passes):
#   0. preflight (seconds): CUDA device, torch, triton, transformers, peft with ArrowConfig, pytest, pytest-timeout;
#      anything missing ends the run with status 2 and names it;
#   1. install the package editable without dependencies and without compiling; in the background, build the
#      compiled extension with its CUDA kernel for this GPU's architecture (setup.py build_ext --inplace);
#   2. the Triton tests on the GPU: the edge-shape kernel tests of tests/triton_kernels (they run on CUDA when there
#      is a device, in bf16 too) and every `-m gpu` test there (Phi-3 shapes, CUDA graphs, torch.compile, no host
#      sync, offsets past 2^31, end-to-end patched Phi-3);
#   3. the benchmarks, python -m benchmarks.bench_gpu (alternating base/ours under CUDA graphs, rotated weights,
#      outputs checked at the benchmark shapes) and the cost model's predictions for this GPU;
#   4. the CUDA prototype tests with the extension built in stage 1 (GKF_GPU_CHECK_EXTENSION=off skips this stage
#      and says so);
#   5. benchmarks/write_results.py: RESULTS_gpu.md from the benchmark JSON (device, torch and triton versions).
# The AOT compile + spill check needs no GPU: it runs in `make test` under the device image's Triton.
#
# Outputs go to $OUT when that variable is set, else to benchmarks/results/gpu/ in the repository: gpu_check.log,
# gpu_tests.xml, proto_tests.xml, ext_build.log, bench_gpu.json, gpu_model.txt, RESULTS_gpu.md.
# Exit status: 0 all passed, 1 a stage failed or timed out, 2 the preflight found something missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
: >"$LOG"
T0=$SECONDS
say() { echo "== [$((SECONDS - T0)) s] $*" | tee -a "$LOG"; }
status=0

# 0. Preflight -------------------------------------------------------------------------------------------------------
say "preflight"
if ! timeout 60 "$PY" - 2>&1 <<'EOF' | tee -a "$LOG"; then
import importlib
import sys

missing = []
for name in ("torch", "triton", "transformers", "peft", "pytest", "pytest_timeout", "safetensors"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '')}")
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
try:
    from peft import ArrowConfig, create_arrow_model  # noqa: F401
except Exception as exc:  # noqa: BLE001
    missing.append(f"peft.ArrowConfig / create_arrow_model (peft >= 0.17): {exc}")
try:
    import torch

    if not torch.cuda.is_available():
        missing.append(f"a CUDA device (torch {torch.__version__} sees none)")
    else:
        print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
except Exception:  # noqa: BLE001
    pass
if missing:
    print("MISSING: " + "; ".join(missing))
    sys.exit(2)
EOF
    say "preflight failed: nothing was run"
    exit 2
fi

# 1. Install, and build the extension in the background ---------------------------------------------------------------
say "install: pip install -e . (no dependencies, no network, no compile)"
GENKNOWSUB_FAST_EXTENSION=off "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 \
    | tail -3 | tee -a "$LOG"
ext="${GKF_GPU_CHECK_EXTENSION:-on}"
build_pid=""
if [[ "$ext" != "off" ]]; then
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    say "background: build the extension with its CUDA kernel for sm_${arch/./} (log: ext_build.log)"
    (TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=8 timeout -s INT -k 20 200 "$PY" setup.py build_ext --inplace \
        >"$OUT_DIR/ext_build.log" 2>&1; echo "build exit code $?" >>"$OUT_DIR/ext_build.log") &
    build_pid=$!
fi

run_pytest() {  # name, stage timeout (s), junit file, pytest arguments...
    local name=$1 limit=$2 xml=$3
    shift 3
    say "$name (stage timeout ${limit} s)"
    timeout -s INT -k 20 "$limit" "$PY" -m pytest -p no:cacheprovider -o junit_family=xunit1 --junitxml="$xml" \
        --timeout=90 -rfEs "$@" 2>&1 | tee -a "$LOG" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" | tail -3
    local rc=${PIPESTATUS[0]}
    say "$name: exit code $rc"
    [[ $rc -eq 0 ]] || status=1
}

# 2. Triton tests on the GPU (the extension stays off here: the end-to-end test builds its library on the torch
# path, so no test waits for a compile) ----------------------------------------------------------------------------
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 12)
GENKNOWSUB_FAST_EXTENSION=off run_pytest "Triton tests on the GPU" 110 "$OUT_DIR/gpu_tests.xml" "${xdist[@]}" -v \
    tests/triton_kernels --ignore=tests/triton_kernels/test_aot.py

# 3. Benchmarks and the cost model's predictions ------------------------------------------------------------------------
say "cost model predictions (benchmarks/gpu_model.py)"
dev=$("$PY" -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name() else 'h100')")
"$PY" -m benchmarks.gpu_model --device "$dev" >"$OUT_DIR/gpu_model.txt" 2>&1 || status=1
say "benchmarks (python -m benchmarks.bench_gpu, stage timeout 100 s)"
GENKNOWSUB_FAST_EXTENSION=off timeout -s INT -k 20 100 "$PY" -m benchmarks.bench_gpu --rounds 9 \
    --json "$OUT_DIR/bench_gpu.json" 2>&1 | tee -a "$LOG" | tail -4
rc=${PIPESTATUS[0]}
say "benchmarks: exit code $rc"
[[ $rc -eq 0 ]] || status=1

# 4. CUDA prototype tests with the built extension ------------------------------------------------------------------
if [[ -n "$build_pid" ]]; then
    wait "$build_pid"
    tail -3 "$OUT_DIR/ext_build.log" | tee -a "$LOG"
    # setup.py reports a failed build with one line and exit code 0 (the extension is optional): look for the library.
    if grep -q "build exit code 0" "$OUT_DIR/ext_build.log" && compgen -G "genknowsub_fast/_C*.so" >/dev/null; then
        run_pytest "CUDA prototype tests" 30 "$OUT_DIR/proto_tests.xml" -v tests/backends/test_prototype_ext.py -m gpu
    else
        say "CUDA prototype tests: not run, the extension was not built (see ext_build.log)"
        status=1
    fi
else
    say "CUDA prototype tests: not run (GKF_GPU_CHECK_EXTENSION=off)"
fi

# 5. Results -----------------------------------------------------------------------------------------------------
if [[ -f "$OUT_DIR/bench_gpu.json" ]]; then
    say "write_results.py -> $OUT_DIR/RESULTS_gpu.md"
    "$PY" benchmarks/write_results.py "$OUT_DIR/bench_gpu.json" -o "$OUT_DIR/RESULTS_gpu.md" \
        --command "bash benchmarks/gpu_check.sh" 2>&1 | tee -a "$LOG"
    grep -E "missed|met|FAILED" "$OUT_DIR/RESULTS_gpu.md" | tee -a "$LOG" | head -60 || true
else
    say "no bench_gpu.json: the benchmark stage wrote nothing"
    status=1
fi
say "done (status $status); outputs in $OUT_DIR"
exit "$status"
