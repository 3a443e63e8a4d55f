#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine's image lacks for benchmarks/gpu_bench.py, because that
# machine has no network: pinned wheels of trl, datasets, liger-kernel and those of their dependencies the
# image does not hold (checked against its package list in the device notes), plus a copy of the Reuters
# corpus and the Qwen2.5 tokenizer, since only the repository travels there.
# Run it here, with network, from any directory: benchmarks/gpu/make_wheelhouse.sh
# Then on the GPU machine: bash benchmarks/gpu_all.sh --out $OUT   (carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/../.."
# Pinned to the versions the CPU smoke test runs against here. The image already has accelerate, fsspec,
# xxhash, pandas, pyarrow, huggingface-hub, tqdm, pyyaml, jinja2, psutil, triton and transformers;
# datasets also needs dill and multiprocess, which it lacks.
WHEELS=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    liger-kernel==0.8.5
)
DATA="${PACKED_SHARDS_DATA:-../shared/data}"
mkdir -p .whl/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
cp "$DATA/corpus/reuters21578/reuters21578.jsonl" .whl/data/
mkdir -p .whl/data/qwen2.5-tokenizer
cp "$DATA"/qwen2.5-tokenizer/tokenizer.json "$DATA"/qwen2.5-tokenizer/tokenizer_config.json .whl/data/qwen2.5-tokenizer/
for wheel in .whl/*.whl; do
    echo "$(basename "$wheel"): $(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' \
        | grep -v 'extra ==' | sed 's/Requires-Dist: //' | tr '\n' ' ')"
done
echo "wheels: $(du -ch .whl/*.whl | tail -1 | cut -f1); with the corpus and tokenizer: $(du -sh .whl | cut -f1)"
