#!/usr/bin/env bash
# All of paadet's GPU work in one go (about 9-10 minutes on one H100; give it a 600 s limit): parity of CUDA
# FP32/FP16 with CPU FP32, `paadet bench` (engine + e2e, preset 800, FP16) at batch 1, 8 and 32, the profile
# of post-processing and network at batch 32, each CUDA option measured alone, and `paadet train`'s s/iter on
# CUDA in float32, --amp bf16 and --amp fp16 (its gradient scaler's first run anywhere).
#
# Run from the repository root on a machine with CUDA and a Python that has torch (no network needed):
#     OUT=/some/folder bash scripts/gpu_check.sh
# Results (at most 8 files, flat): $OUT/log.txt (the environment first, then every step's output), parity.json,
# bench_b1.json, bench_b8.json, bench_b32.json, profile_b32.json (post-processing alone, kernels and syncs; the
# network's kernels by kind), variants_b32.json, train_amp.json (benchmarks/bench_amp.py). Exit status: 1 if the
# parity check failed or a step errored, else 0.
set -uo pipefail

OUT="${OUT:-$(mktemp -d)}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
status=0
export PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

{
    date
    nvidia-smi || true
    "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    "$PYTHON" -c "import torchvision; print('torchvision', torchvision.__version__)" || echo "torchvision: not installed (GPU JPEG decoding off)"
    "$PYTHON" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" || true
    lscpu | grep -E "Model name|^CPU\(s\)" || true
} > "$LOG" 2>&1

# paadet from this working tree, without touching its dependencies (the machine has no network). Everything
# below runs with `python -m` from the repository root, so it also works if this install step fails.
step install 90 "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-cache-dir -e .
if ! "$PYTHON" -c "import paadet.bench.run" >> "$LOG" 2>&1; then
    echo "paadet is not importable from $(pwd); giving up" | tee -a "$LOG"
    exit 1
fi
PAADET=("$PYTHON" -m paadet.cli)

# most important first: if the device call runs out of time, what is done has been written
bench() {  # bench BATCH LIMIT
    step "bench_b$1" "$2" "${PAADET[@]}" bench --device cuda --preset 800 --fp16 --batch-size "$1" \
        --warmup 3 --iters 10 --json "$OUT/bench_b$1.json"
}
bench 32 90
step parity 150 "$PYTHON" -m scripts.gpu_check parity --out "$OUT/parity.json"
step profile_b32 100 "$PYTHON" -m scripts.gpu_check profile --batch-size 32 --out "$OUT/profile_b32.json"
step variants_b32 240 "$PYTHON" -m scripts.gpu_check variants --batch-size 32 --iters 10 --out "$OUT/variants_b32.json"
step train_amp 100 "$PYTHON" benchmarks/bench_amp.py --device cuda --iters 11 --rounds 1 \
    --settings "recipe 1333x800 b2" --json "$OUT/train_amp.json"
bench 8 60
bench 1 60

echo "gpu_check: done, status $status, results in $OUT" | tee -a "$LOG"
exit $status
