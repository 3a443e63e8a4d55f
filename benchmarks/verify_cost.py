"""What opening a packed dataset costs at each `verify` level, per GB of shards, on this machine.

Packs the bundled sample repeatedly into one folder of about ``--gb`` GB (synthetic rows, real format),
then times ``PackedDataset(root, verify=...)`` plus opening every split for ``none``, ``size`` and
``checksum``, side by side in one run. The page cache is warm after the first pass (we do not drop it:
other people share the machine), so these are CPU costs; a cold read adds the disk's read time.

Usage: python benchmarks/verify_cost.py --gb 1 --work benchmarks/_work/verify
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from prep.packing import make_plan
from prep.writer import TokenStore, write_split
from shared.contract import shard_metadata
from shared.fileio import sha256_file
from shared.manifest import DocumentAccounting, Manifest, PackOptions, TokenizerInfo
from shared.reader import PackedDataset


def build(root: Path, gb: float, seq_len: int = 4096) -> None:
    rng = np.random.default_rng(0)
    num_tokens = int(gb * 2**30 / 12)  # three int32 columns per token dominate the bytes
    doc_len = rng.integers(50, 3 * seq_len, size=max(1, num_tokens // (3 * seq_len // 2)))
    tokens = rng.integers(3, 150_000, size=int(doc_len.sum()), dtype=np.int32)
    offset = np.concatenate([[0], np.cumsum(doc_len)[:-1]])
    tokens[offset + doc_len - 1] = 1
    store = TokenStore(tokens=tokens, doc_offset=offset, doc_len=doc_len, doc_id=np.arange(len(doc_len)))
    plan = make_plan("bfd", doc_len, seq_len)
    meta = shard_metadata(
        split="train",
        seq_len=seq_len,
        strategy="bfd",
        eos_id=1,
        bos_id=None,
        tokenizer_sha256="0" * 64,
        vocab_size=150_000,
    )
    split = write_split(store, plan, split="train", out_dir=root, metadata=meta, rows_per_shard=20_000)
    n = int(doc_len.sum())
    Manifest(
        tokenizer=TokenizerInfo(path="-", sha256="0" * 64, vocab_size=150_000, eos_token="e", eos_id=1),
        options=PackOptions(
            seq_len=seq_len, strategy="bfd", text_field="text", long_docs="split", val_fraction=0
        ),
        inputs=(),
        documents=DocumentAccounting(docs_in=len(doc_len), packed=len(doc_len), tokens_in=n, tokens_packed=n),
        splits={"train": split},
        created_by="benchmarks/verify_cost.py",
    ).save(root)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/_work/verify"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    build(args.work, args.gb)
    files = sorted(args.work.glob("*.arrow"))
    size_gb = sum(f.stat().st_size for f in files) / 2**30
    for f in files:
        sha256_file(f)  # warm the page cache so every level reads the same way
    print(f"{len(files)} shards, {size_gb:.2f} GiB")
    for verify in ("none", "size", "checksum"):
        start = time.perf_counter()
        ds = PackedDataset(args.work, verify=verify)
        rows = ds.split("train").num_rows
        seconds = time.perf_counter() - start
        print(f"verify={verify:<9} {seconds:7.3f} s  ({seconds / size_gb:6.3f} s/GiB, {rows:,} rows)")
    shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
