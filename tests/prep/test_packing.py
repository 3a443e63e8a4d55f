"""Packing plans alone: fill against the lower bound, fragment order, and every token placed once."""

from __future__ import annotations

import numpy as np
import pytest

from prep.packing import make_plan, plan_bfd, plan_wrapped, split_into_fragments


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
    whole = plan_bfd(doc_len, seq_len, allow_split=False)
    assert whole.num_rows == 1000 and len(whole.seg_len) == 1000
    # Lengths BFD packs perfectly are never cut.
    easy = np.tile([70, 30], 500)
    assert len(plan_bfd(easy, seq_len).seg_len) == 1000


def test_bfd_refuses_long_documents_without_split():
    with pytest.raises(ValueError):
        plan_bfd(np.array([5, 20]), 8, allow_split=False)


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
