"""A huge `--seq-len` costs memory in proportion to the data, not to `--seq-len`, and never overflows int32.

`bfd` used to allocate a segment tree over every free-space value 0..seq_len (about 69 GB at 2e9); its tree
now spans the longest segment. The plan must stay exactly the best fit's, so it is compared with a
brute-force best fit written from the definition.
"""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prep import packing, writer
from prep.cli import app
from prep.packing import plan_bfd
from prep.writer import TokenStore, write_shard
from shared.contract import schema_with_metadata
from shared.reader import PackedDataset


def brute_force_best_fit(blocks, seq_len, row_cap, dtypes, top=None):
    """Best fit by scanning every open row: smallest free space that fits (the row filled last among
    equals), else a new row, else (row cap reached) the largest gap; the definition `_best_fit` must meet."""
    docs, lengths = [], []
    for block_docs, block_lengths in blocks:
        docs += block_docs
        lengths += block_lengths
    open_rows: dict[int, tuple[int, int]] = {}  # row -> (free space, when it got that free space)
    clock = itertools.count()
    piece_doc, piece_row, piece_len = [], [], []
    num_rows = 0
    for doc, n in zip(docs, lengths, strict=True):
        while n > 0:
            fits = [(free, -t, row) for row, (free, t) in open_rows.items() if free >= n]
            if fits:
                free, _, row = min(fits)
                placed = n
                del open_rows[row]
            elif row_cap is None or num_rows < row_cap:
                row, free, placed = num_rows, seq_len, n
                num_rows += 1
            else:
                free, _, row = max((free, t, row) for row, (free, t) in open_rows.items())
                placed = free
                del open_rows[row]
            piece_doc.append(doc)
            piece_row.append(row)
            piece_len.append(placed)
            if free - placed > 0:
                open_rows[row] = (free - placed, next(clock))
            n -= placed
    return tuple(np.array(p, dtype=d) for p, d in zip((piece_doc, piece_row, piece_len), dtypes, strict=True))


@pytest.mark.parametrize("seed", range(12))
def test_bfd_plan_is_the_best_fit_at_any_seq_len(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    doc_len = rng.integers(1, rng.choice([8, 60, 400]), size=rng.integers(1, 120))
    longest = int(doc_len.max())
    # below, at and far above the longest document: the tree is clamped only in the last two
    for seq_len in (max(2, longest // 3), longest, longest + 1, 2 * longest + 3, 10**9):
        for allow_fragments in (True, False):
            if not allow_fragments and longest > seq_len:
                continue
            got = plan_bfd(doc_len, seq_len, allow_fragments=allow_fragments)
            with monkeypatch.context() as m:
                m.setattr(packing, "_best_fit", brute_force_best_fit)
                want = plan_bfd(doc_len, seq_len, allow_fragments=allow_fragments)
            for name in ("seg_doc", "seg_start", "seg_len", "row_ptr"):
                assert np.array_equal(getattr(got, name), getattr(want, name)), (
                    seq_len,
                    allow_fragments,
                    name,
                )


def test_bfd_memory_follows_the_documents_not_seq_len():
    doc_len = np.arange(1, 2001, dtype=np.int64)
    tracemalloc.start()
    try:
        plan = plan_bfd(doc_len, 2_000_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.num_rows == 1 and plan.num_tokens == int(doc_len.sum())
    assert peak < 8 << 20, f"planning 2,000 documents took {peak:,} bytes"


@pytest.mark.slow
def test_huge_seq_len_packs_and_verifies(sample, tmp_path):
    corpus, tokenizer = sample
    out = tmp_path / "out"
    for strategy in ("bfd", "wrapped"):
        args = ["pack", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out), "--overwrite"]
        result = CliRunner().invoke(app, [*args, "--seq-len", "2000000000", "--strategy", strategy])
        assert result.exit_code == 0, result.output
        assert PackedDataset(out).split("train").num_rows == 1
        assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0


def test_seq_len_beyond_int32_is_refused(sample, tmp_path):
    corpus, tokenizer = sample
    args = ["pack", str(corpus), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--seq-len", str(2**31)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--seq-len 2,147,483,648 is more than a row can hold" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    # negative control: the largest int32 is accepted (checked on the config alone: nothing is packed)
    from prep.pipeline import PackConfig

    PackConfig(inputs=("x",), tokenizer="t", out=tmp_path, seq_len=2**31 - 1)


def test_record_batches_keep_their_offsets_inside_int32(tmp_path, monkeypatch):
    """Rows of a huge seq_len go fewer to a record batch; shown with the limit lowered to 1,000 tokens."""
    doc_len = np.full(40, 300, dtype=np.int64)
    tokens = np.arange(int(doc_len.sum()), dtype=np.int32)
    store = TokenStore(tokens, np.concatenate([[0], np.cumsum(doc_len)[:-1]]), doc_len, np.arange(40))
    plan = plan_bfd(doc_len, 900)
    schema = schema_with_metadata({"split": "train"})

    def batch_tokens(path):
        return [len(b.column("input_ids").values) for b in pa.ipc.open_stream(pa.memory_map(str(path)))]

    write_shard(store, plan, rows=(0, plan.num_rows), path=tmp_path / "a.arrow", schema=schema)
    assert max(batch_tokens(tmp_path / "a.arrow")) > 1000  # negative control: one batch, over the limit
    monkeypatch.setattr(writer, "MAX_INT32", 1000)
    write_shard(store, plan, rows=(0, plan.num_rows), path=tmp_path / "b.arrow", schema=schema)
    sizes = batch_tokens(tmp_path / "b.arrow")
    assert len(sizes) > 1 and max(sizes) <= 1000 and sum(sizes) == int(doc_len.sum())
