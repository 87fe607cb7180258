#!/usr/bin/env bash
# One prepared command for a borrowed GPU machine (torch, triton, timm; no DALI, no network, no .venv needed):
#   1. environment   python / torch / triton / timm versions, the GPU
#   2. parity tests  tests/test_kernels.py with CUDA present: compiled Triton kernels vs the reference path,
#                    bf16 tolerances, torch.compile of the whole model
#   3. bench kernels ViT-B/16 shapes (batch 256, 224x224, mask 0.75): the three stages reference vs fused, and the
#                    training step of SupMAE / MAE ViT-B: original recipe, bf16 reference, bf16 fused, fused+compile
#   4. bench model   SupMAE vs MAE ViT-B training step (bf16, fused, compiled): images/s, TFLOP/s, MFU, memory
# then prints the tables. Each step has a time budget (the whole check fits in 5 minutes); a step that fails or runs
# out of time is reported and the next one still runs; the exit status is non-zero if any step failed.
#
# usage: tools/gpu_check.sh [--cpu-smoke] [OUTDIR]
#   OUTDIR     where logs, JSON and Markdown go (default: $OUT when set, else ./gpu_check_out)
#   --cpu-smoke  run the same steps at tiny shapes on CPU (Triton interpreter for the tests) to check the script
# environment: GPU_CHECK_BUDGET_S (total seconds, default 290), GPU_CHECK_PYTHON (interpreter to use),
#   GPU_CHECK_STEPS (comma-separated subset of environment,parity-tests,bench-kernels,bench-model; default all)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE=0
OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) SMOKE=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) OUTDIR="$arg" ;;
    esac
done
OUTDIR="${OUTDIR:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"

# The project's .venv when there is one, else the machine's python (a borrowed GPU box has torch installed there).
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then PY="$GPU_CHECK_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python || true)"; fi
[[ -n "$PY" ]] || { echo "gpu_check: no python found (set GPU_CHECK_PYTHON)" >&2; exit 2; }

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
cd "$ROOT"

TOTAL_BUDGET="${GPU_CHECK_BUDGET_S:-290}"
START=$(date +%s)
FAILED=()
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

# run_step NAME BUDGET_S CMD...: a header, the command under `timeout` (its budget, or what is left of the total),
# output to screen and log; records the outcome without stopping the script.
run_step() {
    local name="$1" budget="$2"; shift 2
    if [[ -n "${GPU_CHECK_STEPS:-}" && ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
        SUMMARY+=("$name: not selected (GPU_CHECK_STEPS)")
        return 0
    fi
    local left=$(( TOTAL_BUDGET - ($(date +%s) - START) ))
    (( budget > left )) && budget=$(( left > 0 ? left : 0 ))
    log ""
    log "=== [$name] budget ${budget}s ($(date -u +%H:%M:%S) UTC) ==="
    log "+ $*"
    if (( budget < 5 )); then
        log "=== [$name] SKIPPED: the total budget of ${TOTAL_BUDGET}s is spent ==="
        FAILED+=("$name (skipped: no time left)"); SUMMARY+=("$name: skipped (no time left)")
        return 0
    fi
    local t0 rc=0
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$LOG" || rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then
        SUMMARY+=("$name: ok (${took}s)")
    elif (( rc == 124 || rc == 137 )); then
        FAILED+=("$name"); SUMMARY+=("$name: TIMED OUT after ${budget}s")
    else
        FAILED+=("$name"); SUMMARY+=("$name: FAILED (exit $rc, ${took}s)")
    fi
    log "=== [$name] ${SUMMARY[-1]#*: } ==="
}

if (( SMOKE )); then
    log "gpu_check: CPU smoke run (tiny shapes; tests under the Triton interpreter) -> $OUTDIR"
    DEVICE_ARGS=(--device cpu)
    TEST_ENV=(env TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=)
    KERNEL_ARGS=(--models supmae_vit_tiny_patch16 --batch-size 2 --img-size 16 --patch-size 8
                 --configs original,ref --warmup 0 --repeats 1 --steps 1 --stage-iters 1)
    MODEL_ARGS=(--models supmae_vit_tiny_patch16,mae_vit_tiny_patch16 --batch-size 2 --img-size 16 --patch-size 8
                --num-classes 10 --no-compile --warmup 0 --repeats 1 --steps 1)
    BUDGETS=(30 100 60 40)
else
    log "gpu_check: GPU run -> $OUTDIR"
    DEVICE_ARGS=(--device cuda)
    TEST_ENV=(env)
    # Two torch.compile rows (one per model) fit the budget; ref+compile can be added with --configs by hand.
    KERNEL_ARGS=(--configs original,ref,fused,fused+compile)
    MODEL_ARGS=(--models supmae_vit_base_patch16,mae_vit_base_patch16 --batch-size 256 --dtype bf16 --fused on --compile)
    BUDGETS=(20 90 120 60)
fi

run_step environment "${BUDGETS[0]}" "$PY" - "$SMOKE" <<'PYEOF'
import importlib.metadata as md, platform, sys
import torch
smoke = sys.argv[1] == "1"
def version(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return "missing"
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {version('triton')}  "
      f"timm {version('timm')}  torchvision {version('torchvision')}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.device_count()} device(s)")
elif not smoke:
    sys.exit("gpu_check: no CUDA device visible to torch; on a CPU machine use --cpu-smoke to check the script")
import model.kernels  # the package must import without DALI
print("model.kernels imports; Triton interpreter:", model.kernels.INTERPRETED)
PYEOF

if [[ " ${FAILED[*]} " == *" environment "* ]]; then
    log ""; log "gpu_check: the environment step failed; not running the others"
    exit 1
fi

run_step parity-tests "${BUDGETS[1]}" "${TEST_ENV[@]}" "$PY" -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider
run_step bench-kernels "${BUDGETS[2]}" "$PY" -m tools.bench kernels "${DEVICE_ARGS[@]}" "${KERNEL_ARGS[@]}" \
    --json "$OUTDIR/bench_kernels.json" --markdown "$OUTDIR/bench_kernels.md"
run_step bench-model "${BUDGETS[3]}" "$PY" -m tools.bench model "${DEVICE_ARGS[@]}" "${MODEL_ARGS[@]}" \
    --json "$OUTDIR/bench_model.json" --markdown "$OUTDIR/bench_model.md"

{
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Command: tools/gpu_check.sh $*  (total $(( $(date +%s) - START ))s of a ${TOTAL_BUDGET}s budget)"
    echo
    for line in "${SUMMARY[@]}"; do echo "- $line"; done
    for md in "$OUTDIR/bench_kernels.md" "$OUTDIR/bench_model.md"; do
        [[ -f "$md" ]] && { echo; cat "$md"; }
    done
} >"$OUTDIR/summary.md"

log ""
log "=================================== summary ==================================="
cat "$OUTDIR/summary.md" | tee -a "$LOG"
log ""
log "files: $OUTDIR/{summary.md,gpu_check.log,bench_kernels.json,bench_kernels.md,bench_model.json,bench_model.md}"
if (( ${#FAILED[@]} )); then
    log "gpu_check: FAILED steps: ${FAILED[*]}"
    exit 1
fi
log "gpu_check: all steps passed"
