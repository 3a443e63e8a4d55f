#!/usr/bin/env bash
# The GPU check, in one command: varlen backends vs the SDPA reference (bf16), isolation, tokens/s, MFU
# and peak memory for Qwen2-0.5B/1.5B shapes (benchmarks/gpu_check.py), then the CLI end to end on the
# device: `prep demo`, `train check` (and its negative control, which must fail) and `train run` on a
# tiny model and on a Qwen2-0.5B-shaped one. Without a GPU it runs the CPU part and says what did not run.
# Runs from a plain checkout (no install): the repository root goes on PYTHONPATH.
# Usage: benchmarks/gpu_check.sh [--out DIR] [gpu_check.py options, e.g. --steps 10 --tokens-per-batch 8192]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=""
if [ "${1:-}" = "--out" ]; then out="$2"; shift 2; fi
out="${out:-$(mktemp -d)}"
mkdir -p "$out"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; elif command -v python3 >/dev/null; then PY=python3; else PY=python; fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "nvidia-smi not found: expecting no GPU"
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then device=cuda; else device=cpu; fi

failed=0
step() {  # step NAME EXPECTED_STATUS COMMAND...: run, time, and count a wrong exit status as a failure
    local name="$1" expected="$2" start=$SECONDS status
    shift 2
    echo
    echo "== $name =="
    "$@"
    status=$?
    echo "$name: exit $status (expected $expected) in $((SECONDS - start)) s"
    if [ "$status" != "$expected" ]; then failed=1; echo "$name: UNEXPECTED EXIT STATUS"; fi
}

step "gpu_check.py" 0 "$PY" benchmarks/gpu_check.py --json "$out/gpu_check.json" "$@"

work=$(mktemp -d)
step "prep demo" 0 "$PY" -m prep.cli demo "$work/demo"
data="$work/demo/packed"
step "train check ($device)" 0 "$PY" -m train.cli check "$data" --device "$device" --attn auto
step "train check --negative-control ($device, must fail)" 1 \
    "$PY" -m train.cli check "$data" --device "$device" --attn auto --negative-control
step "train run tiny-qwen2 ($device)" 0 "$PY" -m train.cli run --data "$data" --model tiny-qwen2 \
    --out "$work/tiny" --device "$device" --attn auto --max-steps 300 --batch-size 2 --lr 1e-2 --log-every 50
cp "$work/tiny/metrics.jsonl" "$out/tiny_metrics.jsonl" 2>/dev/null
cp "$work/tiny/loss.png" "$out/tiny_loss.png" 2>/dev/null
cp "$work/tiny/run.json" "$out/tiny_run.json" 2>/dev/null  # device, attention backend and why, MFU basis
if [ "$device" = cuda ]; then
    # A Qwen2-0.5B-shaped model with random weights, saved as a Hugging Face folder, trained through
    # the CLI: loader, pinned copies, varlen attention, chunked loss, LoRA, checkpoint, adapter.
    "$PY" - "$work/qwen2-0.5b-shape" <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, "benchmarks")
from gpu_check import qwen2_shape

with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(qwen2_shape("qwen2-0.5b-shape")).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
EOF
    step "train run qwen2-0.5b-shape (cuda)" 0 "$PY" -m train.cli run --data "$data" \
        --model "$work/qwen2-0.5b-shape" --out "$work/q05" --device cuda --attn auto --max-steps 40 \
        --batch-size 8 --log-every 10 --eval-every 0
    cp "$work/q05/metrics.jsonl" "$out/q05_metrics.jsonl" 2>/dev/null
    cp "$work/q05/run.json" "$out/q05_run.json" 2>/dev/null
fi
rm -rf "$work"
echo
if [ "$failed" = 0 ]; then echo "gpu_check.sh: every step passed"; else echo "gpu_check.sh: A STEP FAILED"; fi
exit "$failed"
