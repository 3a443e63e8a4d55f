"""Row plans: which slice of which document goes into which row, for `bfd` and `wrapped`.

Input is the token-stream length of every document (BOS/EOS included, long-document policy already
applied); output is a :class:`RowPlan`, a compressed list of segments per row (the row plan; the run plan
is `train plan`'s). No tokens are touched here, so a plan for a billion-token corpus costs a few arrays of
one entry per segment, each in the narrowest integer type that holds its values (:func:`index_dtype`).

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

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("bfd", "wrapped")
BLOCK = 1 << 14
"""Segments handed to the Python best-fit loop at a time: its lists stay small whatever the corpus size."""


def index_dtype(largest: int) -> np.dtype:
    """int32 when every value up to ``largest`` fits in it, else int64."""
    return np.dtype(np.int32) if largest < 2**31 else np.dtype(np.int64)


@dataclass(frozen=True, slots=True)
class RowPlan:
    """Segments in storage order. Row ``r`` holds segments ``row_ptr[r]:row_ptr[r+1]``."""

    seg_doc: np.ndarray
    """Index into the per-document arrays the plan was made from (int32, or int64 past 2**31 documents)."""
    seg_start: np.ndarray
    """Offset of the segment inside its document's token stream (int32 unless a document is longer)."""
    seg_len: np.ndarray
    """Tokens in the segment (int32)."""
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
    seg_doc, seg_len = _fragments(doc_len, seq_len)
    doc_len = np.asarray(doc_len)
    if len(seg_doc) == len(doc_len):
        return seg_doc, np.zeros(len(seg_doc), index_dtype(seq_len)), seg_len
    first = np.searchsorted(seg_doc, seg_doc, side="left")  # first fragment of each fragment's document
    seg_start = (np.arange(len(seg_doc), dtype=np.int64) - first) * seq_len
    return seg_doc, seg_start.astype(index_dtype(int(doc_len.max())), copy=False), seg_len


def _fragments(doc_len: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(seg_doc, seg_len) of :func:`split_into_fragments`, without materialising anything per document when
    no document is longer than a row (then every document is one segment)."""
    doc_len = np.asarray(doc_len)
    num_docs = len(doc_len)
    doc_dtype, len_dtype = index_dtype(num_docs), index_dtype(seq_len)
    if num_docs == 0 or int(doc_len.max()) <= seq_len:
        return np.arange(num_docs, dtype=doc_dtype), doc_len.astype(len_dtype, copy=False)
    num_frags = np.maximum(1, -(-doc_len // seq_len))
    seg_doc = np.repeat(np.arange(num_docs, dtype=doc_dtype), num_frags)
    last = np.cumsum(num_frags) - 1  # index of each document's remainder
    seg_len = np.full(len(seg_doc), seq_len, dtype=len_dtype)
    seg_len[last] = doc_len - (num_frags - 1) * seq_len
    return seg_doc, seg_len


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


def plan_bfd(doc_len: np.ndarray, seq_len: int, *, allow_fragments: bool = True) -> RowPlan:
    """Best-fit-decreasing; with ``allow_fragments``, at most ``lower_bound + floor(lower_bound * FILL_SLACK)`` rows.

    Pure BFD cannot reach the lower bound when many segments are longer than half a row (long transcripts at
    4096: two 3,000-token remainders never share a row). Under a row cap, a segment that fits no gap once
    every allowed row is open is cut to fill the largest gaps. That adds a segment boundary per cut, so the
    cap sits just above the lower bound: corpora that BFD already packs within the slack are not cut at all.
    """
    doc_len = np.asarray(doc_len)
    if not allow_fragments and len(doc_len) and doc_len.max() > seq_len:
        raise ValueError("a document is longer than seq_len but splitting is not allowed")
    seg_doc, seg_len = _fragments(doc_len, seq_len)
    total = int(seg_len.sum())
    lower = -(-total // seq_len)
    row_cap = lower + int(lower * FILL_SLACK) if allow_fragments else None
    # Longest first; ties by document then fragment (the order the fragments are in), so the plan is a
    # function of the input alone.
    order = np.argsort(-seg_len, kind="stable")
    blocks = ((seg_doc[o].tolist(), seg_len[o].tolist()) for o in _blocks(order))
    dtypes = (seg_doc.dtype, index_dtype(len(seg_len)), seg_len.dtype)
    top = min(seq_len, int(seg_len.max())) if len(seg_len) else 1
    piece_doc, piece_row, piece_len = _best_fit(blocks, seq_len, row_cap, dtypes, top)
    del order, seg_doc, seg_len
    return _plan_from_pieces(
        piece_doc, piece_row, piece_len, max_start=int(doc_len.max()) if len(doc_len) else 0
    )


def _blocks(values: np.ndarray) -> Iterator[np.ndarray]:
    for lo in range(0, len(values), BLOCK):
        yield values[lo : lo + BLOCK]


def _best_fit(
    blocks: Iterator[tuple[list[int], list[int]]],
    seq_len: int,
    row_cap: int | None,
    dtypes: tuple[np.dtype, np.dtype, np.dtype],
    top: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place each segment in the open row with the smallest free space that fits; returns the pieces.

    ``blocks``: ``(documents, lengths)`` of the segments in placement order (longest first), a block at a
    time; ``dtypes``: of the pieces' documents, rows and lengths (kept in typed arrays, not lists of ints).

    The tree spans free space 0..``top`` (the longest segment), not 0..seq_len: a row with more room than
    that fits every segment, so those rows share the top slot. Segments come longest first, and a row is
    opened only when no open row fits, so at most one open row is that roomy: the plan is the one a tree over
    every free-space value would give, while memory follows the data rather than `--seq-len`.
    """
    tree = _FreeSpaceTree(top)
    rows_by_free: dict[int, list[int]] = {}
    roomy: dict[int, int] = {}  # free space of the rows in the top slot, which does not say it
    piece_doc, piece_row, piece_len = (array({4: "i", 8: "q"}[d.itemsize]) for d in dtypes)
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

    for docs, lengths in blocks:
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
    return tuple(
        np.frombuffer(a, dtype=d) for a, d in zip((piece_doc, piece_row, piece_len), dtypes, strict=True)
    )


def _plan_from_pieces(
    piece_doc: np.ndarray, piece_row: np.ndarray, piece_len: np.ndarray, *, max_start: int
) -> RowPlan:
    """Give each document's pieces consecutive slices of its stream in row order, then store by row.

    Only pieces of documents placed in several pieces need a start other than 0; they are few, so the
    sort that orders them runs on them alone.
    """
    piece_start = np.zeros(len(piece_len), dtype=index_dtype(max_start))
    if len(piece_doc):
        several = np.flatnonzero((np.bincount(piece_doc) > 1)[piece_doc])
        doc, row, length = piece_doc[several], piece_row[several], piece_len[several].astype(np.int64)
        by_doc = np.lexsort((row, doc))
        doc_sorted, len_sorted = doc[by_doc], length[by_doc]
        ends = np.cumsum(len_sorted)
        first_of_doc = np.searchsorted(doc_sorted, doc_sorted, side="left")
        piece_start[several[by_doc]] = ends - len_sorted - (ends - len_sorted)[first_of_doc]
    # Rows in creation order; inside a row, segments in document order.
    storage = np.lexsort((piece_start, piece_doc, piece_row))
    num_rows = int(piece_row.max()) + 1 if len(piece_row) else 0
    row_ptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(piece_row, minlength=num_rows), out=row_ptr[1:])
    del piece_row
    return RowPlan(piece_doc[storage], piece_start[storage], piece_len[storage], row_ptr)


def plan_wrapped(doc_len: np.ndarray, seq_len: int) -> RowPlan:
    """Cut the documents, laid end to end, every ``seq_len`` tokens.

    Each document is one segment, plus one more for every row start that falls inside it; those cuts are
    found per row, so nothing beyond the plan itself is built per document.
    """
    doc_len = np.asarray(doc_len)
    doc_end = np.cumsum(doc_len, dtype=np.int64)
    total = int(doc_end[-1]) if len(doc_len) else 0
    len_dtype = index_dtype(seq_len)
    if total == 0:
        empty = np.zeros(0, np.int32)
        return RowPlan(empty, empty, empty.astype(len_dtype), np.zeros(1, np.int64))
    doc_dtype = index_dtype(len(doc_len))
    # Empty documents hold no token and get no segment.
    kept = (
        np.arange(len(doc_len), dtype=doc_dtype)
        if doc_len.all()
        else np.flatnonzero(doc_len).astype(doc_dtype)
    )
    bounds = np.arange(seq_len, total, seq_len, dtype=np.int64)  # where rows 1.. start
    bound_doc = np.searchsorted(doc_end, bounds, side="right")  # the document holding that token
    bound_doc_start = doc_end[bound_doc] - doc_len[bound_doc]
    inner = bounds > bound_doc_start
    cut, cut_doc, cut_offset = bounds[inner], bound_doc[inner], (bounds - bound_doc_start)[inner]
    # A cut document's first segment ends at its first cut; each cut's segment at the next cut or the end.
    seg_len = np.minimum(doc_len[kept], seq_len).astype(len_dtype)
    first_cut = np.flatnonzero(np.diff(cut_doc, prepend=-1))
    seg_len[np.searchsorted(kept, cut_doc[first_cut])] = cut_offset[first_cut]
    cut_len = np.minimum(cut + seq_len, doc_end[cut_doc]) - cut
    where = np.searchsorted(kept, cut_doc, side="right")  # each cut's segment follows its document's
    seg_doc = np.insert(kept, where, cut_doc.astype(doc_dtype))
    seg_start = np.insert(np.zeros(len(kept), index_dtype(int(doc_len.max()))), where, cut_offset)
    seg_len = np.insert(seg_len, where, cut_len.astype(len_dtype))
    # Index of the segment each row starts with: a cut's own, or the document's that starts the row.
    bound_where = np.searchsorted(kept, bound_doc, side="right")
    at_doc = bound_where - 1
    row_first = np.where(
        inner, bound_where + np.cumsum(inner) - 1, at_doc + np.searchsorted(where, at_doc, side="right")
    )
    row_ptr = np.concatenate([[0], row_first, [len(seg_doc)]]).astype(np.int64)
    return RowPlan(seg_doc, seg_start, seg_len, row_ptr)


def make_plan(strategy: str, doc_len: np.ndarray, seq_len: int, *, allow_fragments: bool = True) -> RowPlan:
    """``allow_fragments=False`` (``--long-docs truncate|drop``) keeps every document in one segment under ``bfd``."""
    if strategy == "bfd":
        return plan_bfd(doc_len, seq_len, allow_fragments=allow_fragments)
    if strategy == "wrapped":
        return plan_wrapped(doc_len, seq_len)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
