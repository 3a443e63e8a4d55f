"""Packing plans alone: fill against the lower bound, fragment order, and every token placed once."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from prep.packing import (
    FILL_SLACK,
    STRATEGIES,
    _best_fit,
    index_dtype,
    make_plan,
    plan_bfd,
    plan_wrapped,
    split_into_fragments,
)


def _assert_plan_covers(plan, doc_len, seq_len):
    rows = plan.row_lengths()
    assert np.all(rows > 0) and np.all(rows <= seq_len)
    for doc, length in enumerate(doc_len):
        mine = np.flatnonzero(plan.seg_doc == doc)  # storage order
        starts, lens = plan.seg_start[mine], plan.seg_len[mine]
        assert starts[0] == 0 and np.array_equal(starts[1:], np.cumsum(lens)[:-1]), (
            f"doc {doc} fragments out of order"
        )
        assert lens.sum() == length
    row_of_seg = np.repeat(np.arange(plan.num_rows), np.diff(plan.row_ptr))
    for r in range(plan.num_rows):
        docs = plan.seg_doc[plan.row_ptr[r] : plan.row_ptr[r + 1]]
        assert len(set(docs.tolist())) == len(docs), f"row {r} holds two pieces of one document"
    assert len(row_of_seg) == len(plan.seg_len)


def test_split_into_fragments():
    seg_doc, seg_start, seg_len = split_into_fragments(np.array([3, 10, 8]), 4)
    assert seg_doc.tolist() == [0, 1, 1, 1, 2, 2]
    assert seg_start.tolist() == [0, 0, 4, 8, 0, 4]
    assert seg_len.tolist() == [3, 4, 4, 2, 4, 4]


def test_bfd_small_example():
    plan = plan_bfd(np.array([5, 3, 2, 4, 6]), 8)
    # Lower bound ceil(20 / 8) = 3 rows: {6, 2}, {5, 3}, {4}.
    assert plan.num_rows == 3
    assert sorted(plan.row_lengths().tolist()) == [4, 8, 8]


@pytest.mark.parametrize("seq_len", [16, 128, 1024])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfd_fill_near_lower_bound(seq_len, seed):
    rng = np.random.default_rng(seed)
    doc_len = np.maximum(2, rng.lognormal(np.log(seq_len / 3), 1.2, size=2000).astype(np.int64))
    plan = plan_bfd(doc_len, seq_len)
    _assert_plan_covers(plan, doc_len, seq_len)
    lower = -(-doc_len.sum() // seq_len)
    assert plan.num_rows <= lower + lower // 1000


def test_bfd_cuts_to_fill_only_when_needed():
    # Documents of 0.6 rows can never share a row whole: pure BFD needs one row each.
    seq_len = 100
    doc_len = np.full(1000, 60)
    plan = plan_bfd(doc_len, seq_len)
    _assert_plan_covers(plan, doc_len, seq_len)
    assert plan.num_rows == 600  # the lower bound
    whole = plan_bfd(doc_len, seq_len, allow_fragments=False)
    assert whole.num_rows == 1000 and len(whole.seg_len) == 1000
    # Lengths BFD packs perfectly are never cut.
    easy = np.tile([70, 30], 500)
    assert len(plan_bfd(easy, seq_len).seg_len) == 1000


def test_bfd_refuses_long_documents_without_split():
    with pytest.raises(ValueError):
        plan_bfd(np.array([5, 20]), 8, allow_fragments=False)


def test_wrapped_cuts_every_seq_len():
    doc_len = np.array([5, 3, 9, 1])
    plan = plan_wrapped(doc_len, 4)
    assert plan.row_lengths().tolist() == [4, 4, 4, 4, 2]
    _assert_plan_covers(plan, doc_len, 4)
    assert plan.seg_doc.tolist() == [0, 0, 1, 2, 2, 2, 3]  # doc 1 ends exactly at the cut at 8


def test_plans_are_deterministic():
    rng = np.random.default_rng(7)
    doc_len = rng.integers(1, 300, size=500)
    for strategy in ("bfd", "wrapped"):
        a, b = make_plan(strategy, doc_len, 128), make_plan(strategy, doc_len, 128)
        for field in ("seg_doc", "seg_start", "seg_len", "row_ptr"):
            assert np.array_equal(getattr(a, field), getattr(b, field))


def test_empty_plan():
    for strategy in ("bfd", "wrapped"):
        plan = make_plan(strategy, np.zeros(0, np.int64), 16)
        assert plan.num_rows == 0 and plan.num_tokens == 0


def _reference_plan(strategy: str, doc_len: np.ndarray, seq_len: int, allow_fragments: bool) -> tuple:
    """The plans written the plain way (int64 everywhere, every piece sorted): what the lean code must equal."""
    doc_len = doc_len.astype(np.int64)
    if strategy == "wrapped":
        doc_start = np.concatenate([[0], np.cumsum(doc_len)])
        total = int(doc_start[-1])
        cuts = np.union1d(doc_start[:-1], np.arange(0, total, seq_len))
        seg_global = cuts[cuts < total]
        seg_doc = np.searchsorted(doc_start, seg_global, side="right") - 1
        row_ptr = np.searchsorted(seg_global // seq_len, np.arange(-(-total // seq_len) + 1))
        seg_len = np.append(seg_global[1:], total) - seg_global
        return seg_doc, seg_global - doc_start[seg_doc], seg_len, row_ptr
    num_frags = np.maximum(1, -(-doc_len // seq_len))
    seg_doc = np.repeat(np.arange(len(doc_len)), num_frags)
    seg_start = (np.arange(len(seg_doc)) - np.repeat(np.cumsum(num_frags) - num_frags, num_frags)) * seq_len
    seg_len = np.minimum(seq_len, doc_len[seg_doc] - seg_start)
    lower = -(-int(seg_len.sum()) // seq_len)
    row_cap = lower + int(lower * FILL_SLACK) if allow_fragments else None
    order = np.lexsort((seg_start, seg_doc, -seg_len))
    blocks = [(seg_doc[order].tolist(), seg_len[order].tolist())]
    pieces = [
        # A tree over every free-space value (top = seq_len): the plain computation the bounded tree equals.
        p.astype(np.int64)
        for p in _best_fit(iter(blocks), seq_len, row_cap, (np.dtype(np.int64),) * 3, top=seq_len)
    ]
    piece_doc, piece_row, piece_len = pieces
    by_doc = np.lexsort((piece_row, piece_doc))
    ends = np.cumsum(piece_len[by_doc])
    starts = ends - piece_len[by_doc]
    piece_start = np.empty_like(piece_len)
    piece_start[by_doc] = starts - starts[np.searchsorted(piece_doc[by_doc], piece_doc[by_doc])]
    storage = np.lexsort((piece_start, piece_doc, piece_row))
    num_rows = int(piece_row.max()) + 1 if len(piece_row) else 0
    row_ptr = np.searchsorted(piece_row[storage], np.arange(num_rows + 1))
    return piece_doc[storage], piece_start[storage], piece_len[storage], row_ptr


def _random_lengths(rng: np.random.Generator, seq_len: int) -> np.ndarray:
    n = int(rng.integers(0, 150))
    shape = rng.integers(4)
    if shape == 0:
        doc_len = rng.integers(1, seq_len // 4 + 2, n)
    elif shape == 1:
        doc_len = rng.integers(seq_len // 2 + 1, 4 * seq_len + 1, n)
    elif shape == 2:
        doc_len = rng.choice([seq_len - 1, seq_len, seq_len + 1, 2 * seq_len], n)
    else:
        doc_len = np.where(
            rng.random(n) < 0.5, rng.integers(1, seq_len + 1, n), rng.integers(1, 6 * seq_len, n)
        )
    if n and rng.random() < 0.15:
        doc_len[rng.integers(0, n, 3)] = 0  # empty streams get no segment
    return doc_len[doc_len >= 0]


@pytest.mark.slow
def test_lean_plans_equal_the_plain_computation():
    """The narrow-dtype, per-row and few-pieces-sorted shortcuts change no plan, over 600 random corpora."""
    rng = np.random.default_rng(13)
    checked = 0
    for _ in range(600):
        seq_len = int(rng.integers(2, 300))
        doc_len = _random_lengths(rng, seq_len)
        for strategy, allow_fragments in (("bfd", True), ("bfd", False), ("wrapped", True)):
            if not allow_fragments and len(doc_len) and doc_len.max() > seq_len:
                continue
            plan = make_plan(strategy, doc_len, seq_len, allow_fragments=allow_fragments)
            want = _reference_plan(strategy, doc_len, seq_len, allow_fragments)
            for field, expected in zip(("seg_doc", "seg_start", "seg_len", "row_ptr"), want, strict=True):
                assert np.array_equal(getattr(plan, field), expected), (strategy, seq_len, doc_len, field)
            checked += 1
    assert checked > 1200


def test_reference_comparison_catches_a_changed_plan():
    """Negative control: a plan whose segments within a row are in another order is told apart."""
    doc_len = np.array([3, 5, 2, 6, 1])
    plan = make_plan("bfd", doc_len, 8)
    want = _reference_plan("bfd", doc_len, 8, True)
    swapped = plan.seg_doc.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert np.array_equal(plan.seg_doc, want[0]) and not np.array_equal(swapped, want[0])


def test_plans_use_the_narrowest_integer_type():
    plan = make_plan("bfd", np.array([3, 20, 5]), 8)
    assert {plan.seg_doc.dtype, plan.seg_start.dtype, plan.seg_len.dtype} == {np.dtype(np.int32)}
    assert index_dtype(2**31 - 1) == np.int32 and index_dtype(2**31) == np.int64


@pytest.mark.slow
def test_planning_memory_is_a_few_arrays_per_document():
    """Traced allocations while planning 50k tiny documents: bounded per document, for both strategies.

    The bound (64 bytes) is what a handful of int32/int64 arrays need; the plain computation (Python lists
    of every segment, int64 everywhere, every piece sorted) exceeds it (the control)."""
    rng = np.random.default_rng(3)
    doc_len = rng.integers(4, 20, 50_000).astype(np.int32)

    def bytes_per_document(plan) -> float:
        tracemalloc.start()
        try:
            plan()
            return tracemalloc.get_traced_memory()[1] / len(doc_len)
        finally:
            tracemalloc.stop()

    for strategy in STRATEGIES:
        used = bytes_per_document(lambda s=strategy: make_plan(s, doc_len, 1024))
        assert used < 64, f"{strategy}: {used:.0f} bytes per document"
    assert bytes_per_document(lambda: _reference_plan("bfd", doc_len, 1024, True)) > 64
