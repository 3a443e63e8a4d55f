"""Packing plans: which slice of which document goes into which row, for `bfd` and `wrapped`.

Input is the token-stream length of every document (BOS/EOS included, long-document policy already
applied); output is a :class:`PackPlan`, a compressed list of segments per row. No tokens are touched
here, so a plan for a billion-token corpus costs a few arrays of one entry per segment.

``bfd`` is global best-fit-decreasing. Documents longer than ``seq_len`` are first cut into full
``seq_len`` fragments plus a remainder holding the EOS. Segments are placed longest first, each into the
open row whose free space is the smallest that still fits (a segment tree over free-space values finds it
in O(log seq_len)). Under ``--long-docs split`` the number of rows is capped just above the lower bound
ceil(tokens / seq_len), and a segment that fits no gap once the cap is reached fills the largest gaps.
A plan only fixes each piece's row and length; a document's pieces then take consecutive slices of its
token stream in row order, so fragments always appear in storage order and the EOS ends the last one.

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
    first = np.cumsum(num_frags) - num_frags
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

    def largest(self) -> int | None:
        count = self.count
        if not count[1]:
            return None
        i = 1
        while i < self.size:
            i = 2 * i + 1 if count[2 * i + 1] else 2 * i
        return i - self.size


FILL_SLACK = 0.001
"""``bfd`` may use at most this share of rows above the lower bound before it splits documents to fill gaps."""


def plan_bfd(doc_len: np.ndarray, seq_len: int, *, allow_split: bool = True) -> PackPlan:
    """Best-fit-decreasing; with ``allow_split``, at most ``lower_bound + floor(lower_bound * FILL_SLACK)`` rows.

    Pure BFD cannot reach the lower bound when many segments are longer than half a row (long transcripts at
    4096: two 3,000-token remainders never share a row). Under a row cap, a segment that fits no gap once
    every allowed row is open is cut to fill the largest gaps. That adds a segment boundary per cut, so the
    cap sits just above the lower bound: corpora that BFD already packs within the slack are not cut at all.
    """
    doc_len = np.asarray(doc_len, dtype=np.int64)
    if not allow_split and len(doc_len) and doc_len.max() > seq_len:
        raise ValueError("a document is longer than seq_len but splitting is not allowed")
    seg_doc, seg_start, seg_len = split_into_fragments(doc_len, seq_len)
    total = int(seg_len.sum())
    lower = -(-total // seq_len)
    row_cap = lower + int(lower * FILL_SLACK) if allow_split else None
    # Longest first; ties by document then fragment, so the plan is a function of the input alone.
    order = np.lexsort((seg_start, seg_doc, -seg_len))
    piece_doc, piece_row, piece_len = _best_fit(
        seg_doc[order].tolist(), seg_len[order].tolist(), seq_len, row_cap
    )
    return _plan_from_pieces(
        np.array(piece_doc, np.int64), np.array(piece_row, np.int64), np.array(piece_len, np.int64)
    )


def _best_fit(
    docs: list[int], lengths: list[int], seq_len: int, row_cap: int | None
) -> tuple[list[int], list[int], list[int]]:
    """Place each segment in the open row with the smallest free space that fits; returns the pieces.

    The tree spans free space 0..the longest segment, not 0..seq_len: a row with more room than that fits
    every segment, so those rows share the top slot. Segments come longest first, and a row is opened only
    when no open row fits, so at most one open row is that roomy: the plan is the one a tree over every
    free-space value would give, while memory follows the data rather than `--seq-len`.
    """
    top = min(seq_len, max(lengths, default=1))
    tree = _FreeSpaceTree(top)
    rows_by_free: dict[int, list[int]] = {}
    roomy: dict[int, int] = {}  # free space of the rows in the top slot, which does not say it
    piece_doc, piece_row, piece_len = [], [], []
    num_rows = 0

    def take(slot: int) -> tuple[int, int]:
        tree.add(slot, -1)
        row = rows_by_free[slot].pop()
        return row, roomy.pop(row) if slot == top else slot

    def put(row: int, left: int) -> None:
        if left > 0:
            slot = min(left, top)
            if slot == top:
                roomy[row] = left
            rows_by_free.setdefault(slot, []).append(row)
            tree.add(slot, +1)

    for doc, n in zip(docs, lengths, strict=True):
        while n > 0:
            slot = tree.smallest_at_least(n)
            if slot is not None:
                row, free = take(slot)
                placed = n
            elif row_cap is None or num_rows < row_cap:
                row, free, placed = num_rows, seq_len, n
                num_rows += 1
            else:
                # Every allowed row is open and no gap holds the segment: fill the largest gap with its head.
                slot = tree.largest()
                assert slot is not None, "row cap below the lower bound"
                row, free = take(slot)
                placed = free
            piece_doc.append(doc)
            piece_row.append(row)
            piece_len.append(placed)
            put(row, free - placed)
            n -= placed
    return piece_doc, piece_row, piece_len


def _plan_from_pieces(piece_doc: np.ndarray, piece_row: np.ndarray, piece_len: np.ndarray) -> PackPlan:
    """Give each document's pieces consecutive slices of its stream in row order, then store by row."""
    by_doc = np.lexsort((piece_row, piece_doc))
    doc_sorted, len_sorted = piece_doc[by_doc], piece_len[by_doc]
    ends = np.cumsum(len_sorted)
    first_of_doc = np.searchsorted(doc_sorted, doc_sorted, side="left")
    starts_sorted = ends - len_sorted - (ends - len_sorted)[first_of_doc]
    piece_start = np.empty_like(piece_len)
    piece_start[by_doc] = starts_sorted
    # Rows in creation order; inside a row, segments in document order.
    storage = np.lexsort((piece_start, piece_doc, piece_row))
    num_rows = int(piece_row.max()) + 1 if len(piece_row) else 0
    row_ptr = np.searchsorted(piece_row[storage], np.arange(num_rows + 1), side="left")
    return PackPlan(piece_doc[storage], piece_start[storage], piece_len[storage], row_ptr.astype(np.int64))


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


def make_plan(strategy: str, doc_len: np.ndarray, seq_len: int, *, allow_split: bool = True) -> PackPlan:
    """``allow_split=False`` (``--long-docs truncate|drop``) keeps every document in one segment under ``bfd``."""
    if strategy == "bfd":
        return plan_bfd(doc_len, seq_len, allow_split=allow_split)
    if strategy == "wrapped":
        return plan_wrapped(doc_len, seq_len)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
