#!/usr/bin/env bash
# Varlen attention on a GPU: fast backends vs the SDPA reference (bf16), isolation, tokens/s and peak
# memory for Qwen2-0.5B/1.5B-shaped models. Without a GPU it runs the CPU part and says what did not run.
# Usage: benchmarks/gpu_check.sh [--steps N] [--tokens-per-batch N] [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "nvidia-smi not found: expecting no GPU"
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
exec "$PY" benchmarks/gpu_check.py "$@"
