#!/usr/bin/env bash
# Everything a lent GPU session runs, in one command and under 8 minutes on an H100: the wheelhouse
# installed into /tmp/site (the machine has no network), then gpu_check.py (backend agreement,
# isolation, tokens/s vs padded), then gpu_bench.py (every contender on the same work, loss agreement,
# and prep pack scaling with 1-16 workers). Each part has its own time limit, so a slow part cannot
# eat the next one's; every log and JSON lands in --out.
# Prepare on a machine with network: benchmarks/gpu/make_wheelhouse.sh (fills .whl/, git-ignored).
# Usage (the run tool, carry [".whl"]): bash benchmarks/gpu_all.sh --out $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
out=""
if [ "${1:-}" = "--out" ]; then out="$2"; shift 2; fi
out="${out:-$(mktemp -d)}"
mkdir -p "$out"
exec > >(tee "$out/gpu_all.log") 2>&1
PY="${PYTHON:-python3}"
start=$SECONDS
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
nproc
if ls .whl/*.whl >/dev/null 2>&1; then
    # One wheel at a time: pip refuses a whole list for one wheel that does not fit this Python.
    for wheel in .whl/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$wheel" || echo "INSTALL FAILED: $wheel"
    done
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/ here: trl, datasets and liger-kernel contenders will say 'not available'"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
corpus=.whl/data/reuters21578.jsonl
tokenizer=.whl/data/qwen2.5-tokenizer
[ -f "$corpus" ] || corpus=../shared/data/corpus/reuters21578/reuters21578.jsonl
[ -f "$tokenizer/tokenizer.json" ] || tokenizer=../shared/data/qwen2.5-tokenizer

failed=0
part() {  # part NAME SECONDS COMMAND...: run under a time limit, log its exit status and duration
    local name="$1" limit="$2" t0=$SECONDS status
    shift 2
    echo
    echo "== $name (limit ${limit} s) =="
    timeout -k 10 "$limit" "$@"
    status=$?
    echo "$name: exit $status in $((SECONDS - t0)) s"
    [ "$status" = 0 ] || failed=1
}

# Budget: 2.5 min for the checks (one batch size; part 4, the sync check, adds a few short
# training steps), 5.3 for the contenders and prep scaling.
part "gpu_check.py" 150 "$PY" benchmarks/gpu_check.py --steps 5 --tokens-per-batch 16384 \
    --json "$out/gpu_check.json"
part "gpu_bench.py" 320 "$PY" benchmarks/gpu_bench.py --out "$out/bench" --json "$out/gpu_bench.json" \
    --corpus "$corpus" --tokenizer "$tokenizer" --steps 5 "$@"
rm -rf "$out/bench"  # packed shards: large, and rebuilt by the next run
echo
echo "gpu_all.sh: $((SECONDS - start)) s in all; $([ "$failed" = 0 ] && echo 'every part passed' || echo 'A PART FAILED')"
exit "$failed"
