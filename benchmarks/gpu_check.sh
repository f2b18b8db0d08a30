#!/usr/bin/env bash
# GPU checks of the Triton backend and the CUDA prototype kernel, as one prepared run for a machine with one NVIDIA GPU
# (H100/H200), the GPU image's packages and no network:
#
#   bash benchmarks/gpu_check.sh                             # from anywhere; it works in the repository root
#   GKF_GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh     # any machine: the plan and the summary, no command run
#
# Every stage runs under `timeout -s INT -k GRACE BUDGET` with its own budget (BUDGET below), so the whole script is
# bounded by the sum of the budgets plus GRACE per stage; the script refuses to start when that bound exceeds LIMIT_S
# (7 minutes, installs included), and the dry run prints it (tests/benchmarks/test_gpu_check.py runs the dry run).
# SIGINT lets pytest write its JUnit XML and the benchmarks their JSON, which they rewrite after every case.
#
# Stages:
#   preflight  what every stage needs: python, torch with a CUDA device, triton, pytest (missing: exit 2, nothing
#              runs). What only some stages need is listed and those stages say what they skipped: transformers
#              (end-to-end tests, model cases), peft (PEFT rows, the model cases' adapters), pytest-timeout,
#              pytest-xdist, a CUDA compiler (the extension).
#   install    pip install -e . without dependencies, index or compiling; then a fresh interpreter outside the
#              repository must import genknowsub_fast (and its triton_kernels) from this checkout, else the later
#              stages use PYTHONPATH and the summary says so.
#   tests      tests/triton_kernels on the GPU: the kernel tests (on CUDA in every dtype) and the `-m gpu` ones
#              (Phi-3 shapes, E = 256, CUDA graphs, torch.compile, gradients, no host sync, offsets past 2^31,
#              end-to-end patched Phi-3). The AOT compile check needs no GPU and runs in `make test`.
#   bench      python -m benchmarks.bench_gpu --quick --no-model (op level, alternating base/ours, CUDA graphs).
#   model      python -m benchmarks.bench_gpu --quick --model-only (a 4-layer Phi-3-mini-width model).
#   costmodel  python -m benchmarks.gpu_model for this GPU: the predictions the measurements are compared with.
#   extension  build the compiled extension with its CUDA kernel for this GPU only (after every JIT-compiling stage,
#              so the two never compete for the cores), then the CUDA prototype tests.
#   results    benchmarks/write_results.py: RESULTS_gpu.md from the benchmark JSONs.
# A benchmark stage stopped by its budget is reported as interrupted, with the cases it finished; it is not a failure.
#
# Outputs go to $OUT when set, else benchmarks/results/gpu/: gpu_check.log, summary.txt, gpu_tests.xml,
# proto_tests.xml, ext_build.log, bench_gpu.json, bench_model.json, gpu_model.txt/json, RESULTS_gpu.md.
# Exit status: 0 every check passed (benchmarks possibly interrupted), 1 a check failed, 2 the preflight found
# something missing (or the budgets exceed LIMIT_S), 3 the tests were cut short by their budget without a failure.
# In the dry run GKF_GPU_CHECK_FAKE (e.g. "tests=1,bench=124") gives stages an exit status, to test the reporting.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
PY="${PYTHON:-python3}"
DRY="${GKF_GPU_CHECK_DRY_RUN:-0}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INPUT=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

STAGES=(preflight install tests bench model costmodel extension results)
declare -A BUDGET=([preflight]=20 [install]=30 [tests]=120 [bench]=80 [model]=50 [costmodel]=10 [extension]=70
    [results]=10)
GRACE=2
LIMIT_S=420
declare -A STATUS NOTE USED

: >"$LOG"
T0=$SECONDS
say() { echo "== [$((SECONDS - T0)) s] $*" | tee -a "$LOG"; }

total=0
for s in "${STAGES[@]}"; do total=$((total + BUDGET[$s] + GRACE)); done
say "stage budgets: $(for s in "${STAGES[@]}"; do printf '%s=%ss ' "$s" "${BUDGET[$s]}"; done)(+${GRACE}s grace each)"
say "bound: ${total} s of ${LIMIT_S} s; env: HF_HUB_OFFLINE=$HF_HUB_OFFLINE TRANSFORMERS_OFFLINE=$TRANSFORMERS_OFFLINE"
if ((total > LIMIT_S)); then
    say "the stage budgets add up to ${total} s, over the ${LIMIT_S} s limit: fix BUDGET"
    exit 2
fi

fake_rc() {  # the dry run's exit status for a stage (GKF_GPU_CHECK_FAKE), 0 by default
    local item
    IFS=',' read -ra items <<<"${GKF_GPU_CHECK_FAKE:-}"
    for item in "${items[@]}"; do [[ "${item%%=*}" == "$1" ]] && { echo "${item#*=}"; return; }; done
    echo 0
}

# run STAGE CMD...: the command under the stage's budget (output to the log), or in the dry run only its plan.
run() {
    local stage=$1
    shift
    if [[ "$DRY" != "0" ]]; then
        local shown=("${@//$'\n'*/<script>}")  # a multi-line argument (an inline script) as a placeholder
        echo "   [dry run] $stage (${BUDGET[$stage]} s): ${shown[*]}" | tee -a "$LOG"
        return "$(fake_rc "$stage")"
    fi
    timeout -s INT -k "$GRACE" "${BUDGET[$stage]}" "$@" >>"$LOG" 2>&1
}

finish() {  # finish STAGE RC [note]: record the status of a stage from its exit code
    local stage=$1 rc=$2 note=${3:-}
    USED[$stage]=$((SECONDS - STAGE_T0))
    case $rc in
        0) STATUS[$stage]=ok ;;
        124 | 130 | 137) STATUS[$stage]=interrupted ;;
        *) STATUS[$stage]="failed($rc)" ;;
    esac
    NOTE[$stage]=$note
    say "$stage: ${STATUS[$stage]} in ${USED[$stage]} s ${note:+- $note}"
}
start() { STAGE_T0=$SECONDS; say "$1 (budget ${BUDGET[$1]} s)"; }

# 0. Preflight ---------------------------------------------------------------------------------------------------
start preflight
PREFLIGHT=$(
    cat <<'EOF'
import importlib.util
import sys

required = ["torch", "triton", "pytest"]
optional = {"transformers": "end-to-end tests, model cases", "peft": "PEFT rows, model cases",
            "pytest_timeout": "per-test timeouts", "xdist": "parallel tests"}
missing = [m for m in required if importlib.util.find_spec(m) is None]
if not missing:
    import torch
    if not torch.cuda.is_available():
        missing.append(f"a CUDA device (torch {torch.__version__} sees none)")
    else:
        import triton
        print(f"device {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}, "
              f"torch {torch.__version__}, triton {triton.__version__}")
absent = [f"{m} ({why})" for m, why in optional.items() if importlib.util.find_spec(m) is None]
print("optional missing: " + ("; ".join(absent) if absent else "none"))
if missing:
    print("MISSING: " + "; ".join(missing))
    sys.exit(2)
EOF
)
run preflight "$PY" -c "$PREFLIGHT"
rc=$?
preflight_note=$(grep -E "^(device|optional missing|MISSING)" "$LOG" | tail -3 | tr '\n' ' ')
finish preflight "$rc" "$preflight_note"
if [[ $rc -ne 0 ]]; then
    say "preflight failed: nothing else runs"
    exit 2
fi
has() { [[ "$DRY" != "0" ]] || "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

# 1. Install, and check what was installed ------------------------------------------------------------------------
start install
run install env GENKNOWSUB_FAST_EXTENSION=off "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
rc=$?
where=""
if [[ $rc -eq 0 && "$DRY" == "0" ]]; then
    where=$(cd / && "$PY" -c "import genknowsub_fast.triton_kernels as k, genknowsub_fast as g; print(g.__file__)" \
        2>>"$LOG")
fi
if [[ "$DRY" != "0" && $rc -eq 0 ]]; then
    finish install 0 "dry run"
elif [[ $rc -eq 0 && "$where" == "$REPO/genknowsub_fast/__init__.py" ]]; then
    finish install 0 "imports from this checkout"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    finish install "$rc" "install not usable (imports ${where:-nothing}): later stages use PYTHONPATH"
    [[ $rc -eq 0 ]] && STATUS[install]="failed(import)"
fi

# 2. Triton tests on the GPU --------------------------------------------------------------------------------------
start tests
args=(-m pytest -p no:cacheprovider -o junit_family=xunit1 --junitxml="$OUT_DIR/gpu_tests.xml" -q -rfEs
    tests/triton_kernels --ignore=tests/triton_kernels/test_aot.py)
has xdist && args+=(-n 8)
has pytest_timeout && args+=(--timeout=60)
GENKNOWSUB_FAST_EXTENSION=off run tests "$PY" "${args[@]}"
rc=$?
counts=$(grep -E "[0-9]+ (passed|failed|error)" "$LOG" | tail -1 | sed 's/=//g; s/^ *//')
finish tests "$rc" "${counts:-no pytest summary}"

# 3. Op benchmarks, 4. model benchmarks (JSON written after every case) ------------------------------------------
bench_note() {  # cases finished in a benchmark JSON
    [[ -f "$1" ]] || { echo "no JSON"; return; }
    "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); g = {r['group'] for r in d['benchmarks']}; \
print(f\"{len(g)} cases in {sys.argv[1].rsplit('/', 1)[-1]}\" + (' (interrupted)' if d.get('interrupted') else ''))" \
        "$1" 2>/dev/null || echo "unreadable JSON"
}
start bench
GENKNOWSUB_FAST_EXTENSION=off run bench "$PY" -m benchmarks.bench_gpu --quick --no-model --rounds 7 \
    --json "$OUT_DIR/bench_gpu.json"
rc=$?
finish bench "$rc" "$(bench_note "$OUT_DIR/bench_gpu.json")"

start model
if has transformers && has peft; then
    GENKNOWSUB_FAST_EXTENSION=off run model "$PY" -m benchmarks.bench_gpu --quick --model-only --rounds 6 \
        --json "$OUT_DIR/bench_model.json"
    rc=$?
    finish model "$rc" "$(bench_note "$OUT_DIR/bench_model.json")"
else
    finish model 0 "skipped: needs transformers and peft"
    STATUS[model]=skipped
fi

# 5. The cost model's predictions for this GPU ----------------------------------------------------------------------
start costmodel
dev=h100
if [[ "$DRY" == "0" ]]; then
    dev=$("$PY" -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name() else 'h100')")
fi
run costmodel sh -c "\"$PY\" -m benchmarks.gpu_model --device $dev --cases --json \"$OUT_DIR/gpu_model.json\" \
    >\"$OUT_DIR/gpu_model.txt\""
finish costmodel $? "$dev"

# 6. The extension with its CUDA kernel, then the CUDA prototype tests ----------------------------------------------
start extension
arch=9.0
if [[ "$DRY" == "0" ]]; then
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
# setup.py reports a failed build with one line and exit code 0 (the extension is optional): look for the library.
EXT_STEP="TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=\$(nproc) \"$PY\" setup.py build_ext --inplace >\"$OUT_DIR/ext_build.log\" 2>&1 \
    && ls genknowsub_fast/_C*.so >/dev/null \
    && \"$PY\" -m pytest -p no:cacheprovider -o junit_family=xunit1 --junitxml=\"$OUT_DIR/proto_tests.xml\" -q \
       tests/backends/test_prototype_ext.py -m gpu"
run extension sh -c "$EXT_STEP"
finish extension $? "sm_${arch/./}; build log ext_build.log"

# 7. Results ------------------------------------------------------------------------------------------------------------
start results
cat >"$OUT_DIR/merge_json.py" <<'MERGE'
"""Concatenate the benchmark JSONs that exist into the first argument (write_results.py reads one)."""
import json
import os
import sys

data = None
for path in [p for p in sys.argv[2:] if os.path.exists(p)]:
    with open(path) as f:
        d = json.load(f)
    if data is None:
        data = d
    else:
        data["benchmarks"] += d["benchmarks"]
        data["interrupted"] = bool(data.get("interrupted") or d.get("interrupted"))
if data is None:
    sys.exit("no benchmark JSON")
with open(sys.argv[1], "w") as f:
    json.dump(data, f, indent=1)
MERGE
run results sh -c "\"$PY\" \"$OUT_DIR/merge_json.py\" \"$OUT_DIR/bench_all.json\" \"$OUT_DIR/bench_gpu.json\" \
    \"$OUT_DIR/bench_model.json\" && \"$PY\" benchmarks/write_results.py \"$OUT_DIR/bench_all.json\" \
    -o \"$OUT_DIR/RESULTS_gpu.md\" --command 'bash benchmarks/gpu_check.sh'"
finish results $? "RESULTS_gpu.md"

# Summary (one screen) ----------------------------------------------------------------------------------------------
status=0
for s in "${STAGES[@]}"; do
    [[ ${STATUS[$s]:-} == failed* ]] && status=1
done
if [[ $status -eq 0 && (${STATUS[tests]} == interrupted || ${STATUS[extension]} == interrupted) ]]; then
    status=3
fi
{
    echo "gpu_check summary ($([[ "$DRY" != "0" ]] && echo "dry run, " )$((SECONDS - T0)) s of a ${total} s bound)"
    printf '%-10s %-12s %7s %7s  %s\n' stage status seconds budget note
    for s in "${STAGES[@]}"; do
        printf '%-10s %-12s %7s %7s  %s\n' "$s" "${STATUS[$s]:-not run}" "${USED[$s]:--}" "${BUDGET[$s]}" \
            "${NOTE[$s]:-}"
    done
    if [[ -f "$OUT_DIR/RESULTS_gpu.md" ]]; then
        grep -E "missed|met" "$OUT_DIR/RESULTS_gpu.md" | head -8
    fi
    echo "exit status $status (0 ok, 1 a check failed, 2 setup missing, 3 tests or extension cut short by a budget)"
    echo "outputs: $OUT_DIR"
} | tee "$SUMMARY" | tee -a "$LOG"
exit "$status"
