"""Length statistics of a packed dataset (rows, segments, documents), read from the boundaries alone.

Only the `cu_seqlens` and `doc_ids` columns are touched, never the token pages, so statistics of a large
dataset cost a pass over a few numbers per row. `prep inspect` prints them; the data card tabulates and
plots them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.contract import CU_SEQLENS, DOC_IDS
from shared.reader import PackedDataset, Shard, Split, numpy_view

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class SplitStats:
    name: str
    seq_len: int
    row_len: np.ndarray
    """Tokens per row."""
    segs_per_row: np.ndarray
    doc_len: np.ndarray
    """Stored tokens per document (EOS/BOS included, all fragments summed), in doc_id order."""
    segs_per_doc: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_len)

    @property
    def num_tokens(self) -> int:
        return int(self.row_len.sum())

    @property
    def num_docs(self) -> int:
        return len(self.doc_len)

    @property
    def num_segments(self) -> int:
        return int(self.segs_per_row.sum())

    @property
    def num_fragmented_docs(self) -> int:
        return int((self.segs_per_doc > 1).sum())

    @property
    def fill(self) -> float:
        return self.num_tokens / max(1, self.num_rows * self.seq_len)


def _batch_segments(split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segments per row, segment lengths (int32), segment doc ids) over every batch of the split.

    Each shard is mapped afresh and unmapped once read, so the boundary pages read here do not stay
    resident; the per-segment arrays are filled in place rather than concatenated, so they exist once.
    """
    num_segments = sum(_num_segments(shard) for shard in split.shards)
    seg_len = np.empty(num_segments, np.int32)
    seg_doc = np.empty(num_segments, np.int64)
    per_row, at = [], 0
    for shard in split.shards:
        at = _read_shard(Shard(shard.path, shard.info), per_row, seg_len, seg_doc, at)
    assert at == num_segments, "the shards hold other segment counts than their manifest entries"
    return np.concatenate(per_row or [np.zeros(0, np.int64)]), seg_len, seg_doc


def _read_shard(shard: Shard, per_row: list, seg_len: np.ndarray, seg_doc: np.ndarray, at: int) -> int:
    """Append one shard's segments per row, and write its segments from ``at`` on; returns the next ``at``."""
    for batch in shard.batches():
        cu = batch.column(CU_SEQLENS)
        offsets = numpy_view(cu.offsets).astype(np.int64)
        values = numpy_view(cu.values)[offsets[0] : offsets[-1]].astype(np.int64)
        offsets -= offsets[0]
        step = np.diff(values)
        inside = np.ones(len(step), dtype=bool)
        inside[offsets[1:-1] - 1] = False
        per_row.append(np.diff(offsets) - 1)
        d = batch.column(DOC_IDS)
        d_off = numpy_view(d.offsets)
        n = int(d_off[-1] - d_off[0])
        seg_len[at : at + n] = step[inside]
        seg_doc[at : at + n] = numpy_view(d.values)[d_off[0] : d_off[-1]]
        at += n
    return at


def _num_segments(shard: Shard) -> int:
    if shard.info is not None:
        return shard.info.num_segments
    return sum(len(batch.column(DOC_IDS).values) for batch in shard.batches())


def _per_document(seg_len: np.ndarray, seg_doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored tokens, segments) of each document, in doc_id order."""
    if len(seg_doc) == 0 or int(seg_doc.max()) >= 4 * len(seg_doc):
        # Ids spread far apart (a small val split of a large corpus): sort the segments.
        _, inverse, counts = np.unique(seg_doc, return_inverse=True, return_counts=True)
        tokens = np.bincount(inverse.ravel(), weights=seg_len, minlength=len(counts)).astype(np.int64)
        return tokens, counts
    # Ids dense (doc ids count records): count into arrays indexed by id, which costs no sort.
    counts = np.bincount(seg_doc)
    present = counts > 0
    segs_per_doc = counts[present]
    del counts
    tokens = np.zeros(len(present), np.int64)
    np.add.at(tokens, seg_doc, seg_len)
    return tokens[present], segs_per_doc


def split_stats(split: Split, seq_len: int) -> SplitStats:
    segs_per_row, seg_len, seg_doc = _batch_segments(split)
    doc_len, segs_per_doc = _per_document(seg_len, seg_doc)
    del seg_len, seg_doc
    return SplitStats(split.name, seq_len, split.row_lengths(), segs_per_row, doc_len, segs_per_doc)


def dataset_stats(ds: PackedDataset) -> dict[str, SplitStats]:
    return {name: split_stats(ds.split(name), ds.manifest.seq_len) for name in ds.split_names}


def summary(values: np.ndarray) -> dict[str, float]:
    """mean, min, p50, p90, p99 and max of ``values`` (zeros when empty)."""
    if len(values) == 0:
        return dict.fromkeys(("mean", "min", *(f"p{p}" for p in PERCENTILES), "max"), 0.0)
    pct = np.percentile(values, PERCENTILES, method="lower")
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
        "max": float(values.max()),
    }


def log2_histogram(values: np.ndarray) -> list[tuple[int, int, int]]:
    """``(lo, hi, count)`` for power-of-two bins ``[lo, hi)`` from 1 up to the largest value."""
    if len(values) == 0:
        return []
    top = max(1, int(values.max()))
    edges = [1 << k for k in range(top.bit_length() + 1)]
    counts, _ = np.histogram(values, bins=edges)
    return [(lo, hi, int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]


def mask_cells(cu_seqlens: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """The row's block-diagonal causal mask, averaged over a ``cells x cells`` grid.

    Returns ``(fraction, segment)``: the share of allowed (query, key) pairs in each cell, exact whatever
    the downsampling, and the segment of each cell's first query row (for colouring).
    """
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    n = int(cu[-1])
    cells = max(1, min(cells, n))
    edges = (np.arange(cells + 1) * n) // cells
    q = np.arange(n, dtype=np.int64)
    seg = np.searchsorted(cu, q, side="right") - 1
    seg_start = cu[seg]
    # Keys a query may see: [seg_start(q), q]; its overlap with each column's [ka, kb).
    ka, kb = edges[:-1], edges[1:]
    allowed = np.clip(
        np.minimum(q[:, None] + 1, kb[None, :]) - np.maximum(seg_start[:, None], ka[None, :]), 0, None
    )
    per_cell = np.add.reduceat(allowed, edges[:-1], axis=0)
    area = np.diff(edges)[:, None] * np.diff(edges)[None, :]
    return per_cell / area, seg[edges[:-1]]
