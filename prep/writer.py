"""Materialise a :class:`RowPlan` into Arrow shards: gather tokens, derive labels, positions and boundaries.

Everything per token is computed with vectorised numpy over a block of rows at a time, straight from the
on-disk token store, so memory stays bounded by the block size whatever the corpus size. Each shard is
written to a temporary name, synced, and renamed; its sha256 goes into the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from prep.packing import RowPlan
from shared.contract import IGNORE_INDEX, SHARD_SCHEMA, schema_with_metadata, shard_file_name
from shared.fileio import atomic_writer, sha256_file
from shared.manifest import MAX_INT32, ShardInfo, SplitInfo

ROWS_PER_BATCH = 1024
TARGET_SHARD_BYTES = 1 << 28
"""About 256 MB per shard: large enough to keep file counts low, small enough to checksum and copy quickly."""


@dataclass(frozen=True, slots=True)
class TokenStore:
    """Every packed document's token stream (BOS/EOS included) in one flat int32 array, in input order."""

    tokens: np.ndarray
    doc_offset: np.ndarray
    """int64, start of each document's stream in ``tokens``."""
    doc_len: np.ndarray
    """int64, length of each document's stream."""
    doc_id: np.ndarray
    """int64, the document's index among all input records."""
    targets: np.ndarray | None = None
    """uint8 per token of ``tokens``, 1 where it is a target (a pack of conversations, prep/chat_pack.py);
    ``None``: every token is one."""


def default_rows_per_shard(seq_len: int) -> int:
    bytes_per_row = seq_len * 3 * 4  # three int32 token columns dominate
    return max(1, TARGET_SHARD_BYTES // bytes_per_row)


def _arrow(values: np.ndarray) -> pa.Array:
    """A zero-copy Arrow array of a contiguous int32/int64 numpy array (no nulls).

    Not ``pa.array``: its first call imports pandas, which `prep pack` never needs.
    """
    values = np.ascontiguousarray(values)
    kind = {np.dtype(np.int32): pa.int32(), np.dtype(np.int64): pa.int64()}[values.dtype]
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def build_batch(store: TokenStore, plan: RowPlan, row_lo: int, row_hi: int) -> pa.RecordBatch:
    """Rows ``row_lo:row_hi`` of the plan as one record batch (no padding, one list per row)."""
    s_lo, s_hi = int(plan.row_ptr[row_lo]), int(plan.row_ptr[row_hi])
    seg_doc = plan.seg_doc[s_lo:s_hi]
    seg_len = plan.seg_len[s_lo:s_hi]
    seg_src = store.doc_offset[seg_doc] + plan.seg_start[s_lo:s_hi]
    seg_out = np.concatenate([[0], np.cumsum(seg_len)])
    num_tokens = int(seg_out[-1])

    # Token t of the block comes from seg_src[s] + (t - seg_out[s]) for its segment s.
    within = np.arange(num_tokens, dtype=np.int64) - np.repeat(seg_out[:-1], seg_len)
    source = np.repeat(seg_src, seg_len) + within
    input_ids = store.tokens[source].astype(np.int32, copy=False)
    position_ids = within.astype(np.int32)
    labels = input_ids.copy()
    if store.targets is not None:  # a conversation learns only its chosen turns
        labels[store.targets[source] == 0] = IGNORE_INDEX
    labels[seg_out[:-1][seg_len > 0]] = (
        IGNORE_INDEX  # never predict a segment's first token across a boundary
    )

    row_seg_ptr = plan.row_ptr[row_lo : row_hi + 1] - s_lo
    row_tok_ptr = seg_out[row_seg_ptr]
    # cu_seqlens of a row: its segments' starts relative to the row start, then the row length.
    seg_row = np.repeat(np.arange(row_hi - row_lo), np.diff(row_seg_ptr))
    seg_rel = seg_out[:-1] - row_tok_ptr[seg_row]
    cu_values = np.insert(seg_rel, row_seg_ptr[1:], np.diff(row_tok_ptr)).astype(np.int32)
    cu_offsets = (row_seg_ptr + np.arange(row_hi - row_lo + 1)).astype(np.int32)

    tok_offsets = _arrow(row_tok_ptr.astype(np.int32))
    seg_offsets = _arrow(row_seg_ptr.astype(np.int32))
    columns = [
        pa.ListArray.from_arrays(tok_offsets, _arrow(input_ids)),
        pa.ListArray.from_arrays(tok_offsets, _arrow(labels)),
        pa.ListArray.from_arrays(tok_offsets, _arrow(position_ids)),
        pa.ListArray.from_arrays(_arrow(cu_offsets), _arrow(cu_values)),
        pa.ListArray.from_arrays(seg_offsets, _arrow(store.doc_id[seg_doc].astype(np.int64))),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SHARD_SCHEMA)


def shard_ranges(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Row range ``(lo, hi)`` of every shard of a split; an empty split still gets one (empty) shard."""
    num_shards = max(1, -(-num_rows // rows_per_shard))
    return [(k * rows_per_shard, min(num_rows, (k + 1) * rows_per_shard)) for k in range(num_shards)]


def write_shard(
    store: TokenStore,
    plan: RowPlan,
    *,
    rows: tuple[int, int],
    path: Path,
    schema: pa.Schema,
    on_rows: Callable[[int], None] = lambda n: None,
) -> ShardInfo:
    """Write plan rows ``rows[0]:rows[1]`` to ``path`` (atomically); return what the manifest records of it."""
    lo, hi = rows
    # A record batch's offsets are int32: rows of a huge --seq-len go fewer to a batch.
    s_lo, s_hi = int(plan.row_ptr[lo]), int(plan.row_ptr[hi])
    row_ends = np.concatenate([[0], np.cumsum(plan.seg_len[s_lo:s_hi])])[plan.row_ptr[lo : hi + 1] - s_lo]
    longest = int(np.diff(row_ends).max(initial=1))
    per_batch = max(1, min(ROWS_PER_BATCH, MAX_INT32 // longest))
    with atomic_writer(path) as f, pa.ipc.new_stream(f, schema) as writer:
        for b_lo in range(lo, hi, per_batch):
            b_hi = min(hi, b_lo + per_batch)
            writer.write_batch(build_batch(store, plan, b_lo, b_hi))
            on_rows(b_hi - b_lo)
    seg_doc, seg_start, seg_len = plan.seg_doc[s_lo:s_hi], plan.seg_start[s_lo:s_hi], plan.seg_len[s_lo:s_hi]
    # A document ends in the row that holds its final segment (the one reaching the end of its stream).
    ends_doc = seg_start + seg_len == store.doc_len[seg_doc]
    return ShardInfo(
        file=path.name,
        num_rows=hi - lo,
        num_tokens=int(seg_len.sum()),
        num_segments=s_hi - s_lo,
        num_docs=int(ends_doc.sum()),
        num_bytes=path.stat().st_size,
        sha256=sha256_file(path),
    )


def count_targets(store: TokenStore, plan: RowPlan) -> int:
    """Tokens whose label is not ``-100`` in a pack with a target mask: targets less segments' first tokens,
    counted a block of segments at a time from the mask file."""
    assert store.targets is not None
    cumulative = 0
    step = max(1, (1 << 24) // max(1, int(plan.seg_len.max(initial=1))))
    for lo in range(0, len(plan.seg_len), step):
        seg_len = plan.seg_len[lo : lo + step].astype(np.int64)
        src = store.doc_offset[plan.seg_doc[lo : lo + step]] + plan.seg_start[lo : lo + step]
        within = np.arange(int(seg_len.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(seg_len) - seg_len, seg_len
        )
        cumulative += int(store.targets[np.repeat(src, seg_len) + within].sum(dtype=np.int64))
        cumulative -= int(store.targets[src[seg_len > 0]].sum(dtype=np.int64))
    return cumulative


def split_info(store: TokenStore, plan: RowPlan, shards: list[ShardInfo]) -> SplitInfo:
    """The manifest's totals for a split written as ``shards``."""
    ends_doc = plan.seg_start + plan.seg_len == store.doc_len[plan.seg_doc]
    num_tokens = plan.num_tokens
    num_first_tokens = int((plan.seg_len > 0).sum())
    return SplitInfo(
        num_rows=plan.num_rows,
        num_tokens=num_tokens,
        num_target_tokens=(
            num_tokens - num_first_tokens if store.targets is None else count_targets(store, plan)
        ),
        num_segments=len(plan.seg_len),
        num_docs=int(ends_doc.sum()),
        shards=tuple(shards),
    )


def write_split(
    store: TokenStore,
    plan: RowPlan,
    *,
    split: str,
    out_dir: Path,
    metadata: dict,
    rows_per_shard: int,
    on_rows: Callable[[int], None] = lambda n: None,
    reuse: Callable[[str], ShardInfo | None] = lambda file: None,
    on_shard: Callable[[ShardInfo], None] = lambda info: None,
) -> SplitInfo:
    """Write the plan's rows as ``split-XXXXX-of-YYYYY.arrow`` shards; return what the manifest records.

    ``reuse(file)`` returns the ShardInfo of a shard a resumed run already wrote and verified (it is not
    written again); ``on_shard`` is told of every shard once it is durable (prep/journal.py records it).
    """
    schema = schema_with_metadata(metadata)
    ranges = shard_ranges(plan.num_rows, rows_per_shard)
    shards = []
    for index, (lo, hi) in enumerate(ranges):
        path = out_dir / shard_file_name(split, index, len(ranges))
        kept = reuse(path.name)
        if kept is not None:
            shards.append(kept)
            on_rows(hi - lo)
            continue
        info = write_shard(store, plan, rows=(lo, hi), path=path, schema=schema, on_rows=on_rows)
        on_shard(info)
        shards.append(info)
    return split_info(store, plan, shards)
