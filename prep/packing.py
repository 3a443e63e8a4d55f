"""Packing plans: which slice of which document goes into which row, for `bfd` and `wrapped`.

Input is the token-stream length of every document (BOS/EOS included, long-document policy already
applied); output is a :class:`PackPlan`, a compressed list of segments per row. No tokens are touched
here, so a plan for a billion-token corpus costs a few arrays of one entry per segment.

``bfd`` is global best-fit-decreasing. Documents longer than ``seq_len`` are first cut into full
``seq_len`` fragments plus a remainder holding the EOS. Segments are placed longest first, each into the
open row whose free space is the smallest that still fits (a segment tree over free-space values finds it
in O(log seq_len)). Full fragments are placed first and fill their rows, so a document's fragments
always appear in storage order.

``wrapped`` concatenates the documents in input order and cuts the stream every ``seq_len`` tokens;
a document crossing a cut becomes two segments. Rows are all full except the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("bfd", "wrapped")


@dataclass(frozen=True, slots=True)
class PackPlan:
    """Segments in storage order. Row ``r`` holds segments ``row_ptr[r]:row_ptr[r+1]``."""

    seg_doc: np.ndarray
    """int64: index into the per-document arrays the plan was made from."""
    seg_start: np.ndarray
    """int64: offset of the segment inside its document's token stream."""
    seg_len: np.ndarray
    """int64: tokens in the segment."""
    row_ptr: np.ndarray
    """int64, num_rows + 1 entries."""

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.seg_len.sum())

    def row_lengths(self) -> np.ndarray:
        starts = np.concatenate([[0], np.cumsum(self.seg_len)])
        return starts[self.row_ptr[1:]] - starts[self.row_ptr[:-1]]


def split_into_fragments(doc_len: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each document into ``seq_len`` fragments and a remainder: (seg_doc, seg_start, seg_len)."""
    doc_len = np.asarray(doc_len, dtype=np.int64)
    num_frags = np.maximum(1, -(-doc_len // seq_len))
    seg_doc = np.repeat(np.arange(len(doc_len), dtype=np.int64), num_frags)
    first = np.concatenate([[0], np.cumsum(num_frags)[:-1]])
    frag_index = np.arange(len(seg_doc), dtype=np.int64) - np.repeat(first, num_frags)
    seg_start = frag_index * seq_len
    seg_len = np.minimum(seq_len, doc_len[seg_doc] - seg_start)
    return seg_doc, seg_start, seg_len


class _FreeSpaceTree:
    """Counts of open rows by free space 0..capacity, answering "smallest free space >= n" in O(log)."""

    def __init__(self, capacity: int) -> None:
        self.size = 1 << (capacity + 1).bit_length()
        self.count = [0] * (2 * self.size)

    def add(self, free: int, delta: int) -> None:
        i = free + self.size
        while i:
            self.count[i] += delta
            i >>= 1

    def smallest_at_least(self, n: int) -> int | None:
        count, size = self.count, self.size
        # Walk up from leaf n collecting the right siblings in order, then descend into the first non-empty.
        i = n + size
        if count[i]:
            return n
        while i > 1:
            if not i & 1 and count[i + 1]:
                i += 1
                while i < size:
                    i = 2 * i if count[2 * i] else 2 * i + 1
                return i - size
            i >>= 1
        return None


def plan_bfd(doc_len: np.ndarray, seq_len: int) -> PackPlan:
    seg_doc, seg_start, seg_len = split_into_fragments(doc_len, seq_len)
    # Longest first; ties by document then fragment, so the plan is a function of the input alone.
    order = np.lexsort((seg_start, seg_doc, -seg_len))
    seg_row = np.empty(len(seg_len), dtype=np.int64)
    tree = _FreeSpaceTree(seq_len)
    rows_by_free: dict[int, list[int]] = {}
    num_rows = 0
    lengths = seg_len.tolist()
    for i in order.tolist():
        n = lengths[i]
        free = tree.smallest_at_least(n)
        if free is None:
            row, free = num_rows, seq_len
            num_rows += 1
        else:
            row = rows_by_free[free].pop()
            tree.add(free, -1)
        seg_row[i] = row
        left = free - n
        if left > 0:
            rows_by_free.setdefault(left, []).append(row)
            tree.add(left, +1)
    # Rows in creation order; inside a row, segments in document order (easier to read, same result).
    storage = np.lexsort((seg_start, seg_doc, seg_row))
    row_ptr = np.searchsorted(seg_row[storage], np.arange(num_rows + 1), side="left")
    return PackPlan(seg_doc[storage], seg_start[storage], seg_len[storage], row_ptr.astype(np.int64))


def plan_wrapped(doc_len: np.ndarray, seq_len: int) -> PackPlan:
    doc_len = np.asarray(doc_len, dtype=np.int64)
    doc_start = np.concatenate([[0], np.cumsum(doc_len)])
    total = int(doc_start[-1])
    cuts = np.union1d(doc_start[:-1], np.arange(0, total, seq_len, dtype=np.int64))
    seg_global = cuts[cuts < total]
    seg_end = np.append(seg_global[1:], total)
    seg_doc = np.searchsorted(doc_start, seg_global, side="right") - 1
    seg_start = seg_global - doc_start[seg_doc]
    seg_row = seg_global // seq_len
    num_rows = -(-total // seq_len)
    row_ptr = np.searchsorted(seg_row, np.arange(num_rows + 1), side="left")
    return PackPlan(seg_doc.astype(np.int64), seg_start, seg_end - seg_global, row_ptr.astype(np.int64))


def make_plan(strategy: str, doc_len: np.ndarray, seq_len: int) -> PackPlan:
    if strategy == "bfd":
        return plan_bfd(doc_len, seq_len)
    if strategy == "wrapped":
        return plan_wrapped(doc_len, seq_len)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
