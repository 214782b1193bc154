#!/usr/bin/env bash
# The one command to run on a GPU machine: build, test on CUDA tensors, benchmark.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUTDIR]
#
# OUTDIR defaults to $OUT. Everything goes to OUTDIR/gpu_check_<device>_<UTC date>/, flat (eight
# files at most):
#   summary.txt   device, date, commit, and one line per part (exit code, seconds)
#   log.txt       the full output of every part, one after the other, each under a header
#   step_time.{jsonl,png}   the step-time benchmark's rows (bench_common.record) and plot
#   row_sweep.{jsonl,png}   bandwidth by row width, L2 prefetch on and off
#   sharded_step.jsonl      FSDP2 (one rank, nccl; 268M parameters) beside the same unsharded
# To keep a run's numbers, append its rows to the repository's data files and redraw the plots:
#   cat DIR/step_time.jsonl >> benchmarks/results/<gpu>/step_time.jsonl  (the same for the others)
#   python benchmarks/plots.py benchmarks/results/<gpu>
# Parts run in order of importance, each under its own time limit (15 minutes if every part hit
# its limit; an estimated 4-5 minutes on an H200, so a 420 s call should fit; the benchmarks
# record after each size or width, so a run cut short keeps what it measured); a failed part is
# logged and the script goes on. The exit code is the number of failed parts (0: all ran clean).
# --dry-run prints what would run and creates the folder.
# Torch and triton must already be installed; TRITON_INTERPRET is unset (compiled kernels).
# PYTHON overrides the interpreter (default: python3).
set -u

usage() {  # the header comment, whatever its length
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

DRY=0
OUTROOT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [ -n "$OUTROOT" ]; then
                echo "gpu_check.sh: one output directory only (got '$OUTROOT' and '$arg')" >&2; exit 2
            fi
            OUTROOT="$arg" ;;
    esac
done
OUTROOT="${OUTROOT:-${OUT:-}}"
if [ -z "$OUTROOT" ]; then
    echo "gpu_check.sh: give an output directory or set \$OUT" >&2
    exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEVICE_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
DEVICE_NAME="${DEVICE_NAME:-no-gpu}"
SLUG="$(printf '%s' "$DEVICE_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
DIR="$OUTROOT/gpu_check_${SLUG}_${STAMP}"
mkdir -p "$DIR" || { echo "gpu_check.sh: cannot create $DIR" >&2; exit 2; }
SUMMARY="$DIR/summary.txt"
LOG="$DIR/log.txt"
{
    echo "device: $DEVICE_NAME"
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "dry_run: $DRY"
} > "$SUMMARY"

unset TRITON_INTERPRET
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-8}"
export PYTHONUNBUFFERED=1

FAILED=0
# part NAME SECONDS COMMAND...: run COMMAND in the repository, its output appended to log.txt
part() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*"
    if [ "$DRY" = 1 ]; then
        echo "$name: dry-run: $*" >> "$SUMMARY"
        return 0
    fi
    local start rc
    start=$(date +%s)
    echo "======== $name (limit ${limit}s): $*" >> "$LOG"
    (cd "$REPO" && timeout "$limit" "$@") >> "$LOG" 2>&1
    rc=$?
    echo "$name: rc=$rc $(( $(date +%s) - start ))s$([ $rc = 124 ] && echo ' (time limit)')" >> "$SUMMARY"
    echo "   rc=$rc"
    [ $rc = 0 ] || FAILED=$((FAILED + 1))
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE --durations=5)
# the tests that run on CUDA tensors (the rest are CPU tests, run by CI)
CUDA_TESTS=(tests/test_cpp_backend.py tests/test_golden.py tests/test_state_dict.py tests/test_checkpoint.py tests/test_guard.py
            tests/test_capturable.py tests/test_graphs.py tests/test_plan_cache.py tests/test_bad_input.py
            tests/test_two_phase.py)

part env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(\"triton\", triton.__version__)'"
part install 120 "$PY" -m pip install --no-build-isolation --no-deps --use-pep517 -e .
part tests_cuda 120 "${PYTEST[@]}" -n 4 "${CUDA_TESTS[@]}"
part tests_triton 90 "${PYTEST[@]}" -n 8 tests/test_triton.py
part step_time 200 "$PY" benchmarks/step_time.py --device cuda --sizes gpt2-124m,llama-1b \
    --backends cuda,triton,adamw --results "$DIR" --no-progress
part sharded_step 120 "$PY" benchmarks/sharded_step.py --world 1 --layers 16 --width 4096 --rounds 10 --results "$DIR"
part row_sweep 150 "$PY" benchmarks/row_sweep.py --device cuda --backends cuda,triton --results "$DIR"
part tests_large 60 "${PYTEST[@]}" tests/test_large_tensors.py  # alone: each case holds ~40 GB
echo "failed_parts: $FAILED" >> "$SUMMARY"
echo "summary: $SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
