#!/usr/bin/env bash
# The GPU checks of issue 26 in one go, for a lent GPU machine (under 8 minutes; no network,
# no install, the machine's own PyTorch; vLLM not needed). From the repository root:
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/gpu_check bash bench/gpu_check.sh --tiny  # dry run on CPU (what CI can run)
#
# Writes under $OUT (default ./gpu_check_out): device.txt (nvidia-smi, torch and
# transformers versions), test_cuda.txt (pytest -m cuda tests/test_cuda.py),
# prefix_memory.txt (bench/prefix_memory.py on CUDA, bf16: plain / dense / rows / auto peak
# memory), gpu.txt (bench/gpu.py at Qwen3-0.6B's shape: tokens/s, MFU, peak memory; its last
# line is JSON), and summary.txt (each step's exit code and seconds; 124 = its time ran
# out). Each step has its own time limit inside a budget of 470 s in all; a step that fails
# does not stop the next.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python}
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
BUDGET=470
: > "$OUT/summary.txt"

# step NAME CAP_S COMMAND...: run COMMAND with at most CAP_S seconds (less if the budget is
# nearly spent), its output in $OUT/NAME.txt, its exit code and time in summary.txt
step() {
    local name=$1 cap=$2 left
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -le 5 ]; then
        echo "$name skipped: the budget is spent" | tee -a "$OUT/summary.txt"
        return
    fi
    local t0=$(date +%s)
    timeout "$cap" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name exit=$rc seconds=$(($(date +%s) - t0)) limit=$cap" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.txt"
}

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
"transformers", transformers.__version__)'
    "$PY" -c 'import pytest, hypothesis; print("pytest", pytest.__version__)' 2>&1
    uptime
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [ "$TINY" = 1 ]; then
    # CPU: test_cuda.py's tests skip (its helpers run on CPU in their own tests), the
    # benches run their tiny shapes
    step test_cuda 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
    step gpu 200 "$PY" bench/gpu.py --tiny
    step prefix_memory 240 "$PY" bench/prefix_memory.py --model tiny --shapes 4,4,40
else
    step test_cuda 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs
    step gpu 240 "$PY" bench/gpu.py
    # SmolLM2-135M's shape, bf16: the recipe's shape and long responses (a process per case)
    step prefix_memory 240 "$PY" bench/prefix_memory.py --device cuda --dtype bf16 \
        --shapes 150,8,30 32,4,2048
fi
echo "total seconds=$(($(date +%s) - START))" | tee -a "$OUT/summary.txt"
