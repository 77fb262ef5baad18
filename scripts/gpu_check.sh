#!/usr/bin/env bash
# GPU check: one command for a CUDA machine with PyTorch and Triton preinstalled (installs nothing,
# needs no network). Runs the CUDA equivalence tests (pytest -m gpu), then the scan benchmark, and
# writes a report: $OUT/gpu_report.md when OUT is set, else docs/gpu_report.md (and then also the
# gpu section of docs/PERFORMANCE.md). Budget: under 5 minutes on one H100.
#
#   scripts/gpu_check.sh                 # uses python3 (the interpreter that holds torch there)
#   PYTHON=.venv/bin/python scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [[ -n "${OUT:-}" ]]; then
    DEST="$OUT"
    WRITE_DOCS=""
else
    DEST="docs"
    WRITE_DOCS="--write-docs"
fi
mkdir -p "$DEST"
REPORT="$DEST/gpu_report.md"
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY" | tee "$REPORT"
    exit 2
fi

{
    echo "# GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo "- $("$PY" -c 'import sys, torch, triton, numpy; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, numpy {numpy.__version__}")')"
} >"$REPORT"

# 1. CUDA equivalence tests (scan and model). Collection errors in one folder (a package missing
#    on this machine) must not hide the other folder's tests.
TEST_DIRS=(tests/ops)
[[ -d tests/model ]] && TEST_DIRS+=(tests/model)
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    "${TEST_DIRS[@]}" >"$DEST/gpu_tests.log" 2>&1
TEST_RC=$?
tail -n 40 "$DEST/gpu_tests.log"
{
    echo
    echo "## Tests (pytest -m gpu ${TEST_DIRS[*]}): exit code $TEST_RC, after $(elapsed) s"
    echo
    echo '```'
    grep -E "passed|failed|error|FAILED|ERROR" "$DEST/gpu_tests.log" | tail -n 40
    echo '```'
} >>"$REPORT"

# 2. Scan benchmark (GPU tables, triton launch sweep, training step).
timeout 130 "$PY" bench/scan.py --report "$DEST/gpu_bench.md" $WRITE_DOCS >"$DEST/gpu_bench.log" 2>&1
BENCH_RC=$?
tail -n 30 "$DEST/gpu_bench.log"
{
    echo
    echo "## Benchmark (bench/scan.py): exit code $BENCH_RC, after $(elapsed) s"
    echo
    if [[ -f "$DEST/gpu_bench.md" ]]; then
        sed 1d "$DEST/gpu_bench.md"
    else
        echo '```'
        tail -n 20 "$DEST/gpu_bench.log"
        echo '```'
    fi
} >>"$REPORT"
rm -f "$DEST/gpu_bench.md"

echo "gpu_check: tests rc=$TEST_RC, bench rc=$BENCH_RC, $(elapsed) s; report in $REPORT"
[[ $TEST_RC -eq 0 && $BENCH_RC -eq 0 ]]
