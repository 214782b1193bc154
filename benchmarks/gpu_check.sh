#!/usr/bin/env bash
# The one command to run on a GPU machine: build, test on CUDA tensors, benchmark.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUTDIR]
#
# OUTDIR defaults to $OUT. Everything goes to OUTDIR/gpu_check_<device>_<UTC date>/:
#   summary.txt   device, date, commit, versions, and one line per part (exit code, seconds)
#   logs/         <part>.log: full output of each part
#   results/      pytest JUnit XML files, step_time.json (when benchmarks/step_time.py exists)
# Each part runs under its own time limit, logs, and the script continues when it fails; the
# limits add up to under 8 minutes at worst. The exit code is the number of failed parts (0: all ran
# clean). --dry-run prints what would run and creates the folder layout, running nothing.
# Torch and triton must already be installed; TRITON_INTERPRET is unset (compiled kernels).
# PYTHON overrides the interpreter (default: python3).
set -u

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
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
mkdir -p "$DIR/logs" "$DIR/results" || { echo "gpu_check.sh: cannot create $DIR" >&2; exit 2; }
SUMMARY="$DIR/summary.txt"
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

FAILED=0
# part NAME SECONDS COMMAND...: run COMMAND in the repository, output to logs/NAME.log
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
    (cd "$REPO" && timeout "$limit" "$@") > "$DIR/logs/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc $(( $(date +%s) - start ))s$([ $rc = 124 ] && echo ' (time limit)')" >> "$SUMMARY"
    echo "   rc=$rc, log: $DIR/logs/$name.log"
    [ $rc = 0 ] || FAILED=$((FAILED + 1))
}

part env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(\"triton\", triton.__version__)'"
part install 90 "$PY" -m pip install --no-build-isolation -e .
part tests_triton 150 "$PY" -m pytest -q -p no:cacheprovider --durations=10 tests/test_triton.py --junitxml="$DIR/results/pytest_triton.xml"
part tests_rest 90 "$PY" -m pytest -q -p no:cacheprovider --durations=15 tests --ignore=tests/test_triton.py --junitxml="$DIR/results/pytest_rest.xml"
if [ -f "$REPO/benchmarks/step_time.py" ]; then
    part step_time 120 "$PY" benchmarks/step_time.py --device cuda --json "$DIR/results/step_time.json" \
        --csv "$DIR/results/step_time.csv" --plot "$DIR/results/step_time.png" --no-progress
else
    echo "step_time: skipped (benchmarks/step_time.py not found)" >> "$SUMMARY"
    echo "== step_time: skipped (benchmarks/step_time.py not found)"
fi

echo "failed_parts: $FAILED" >> "$SUMMARY"
echo "summary: $SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
