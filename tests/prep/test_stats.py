"""Per-document statistics of the card: counting by doc id and sorting give the same numbers."""

from __future__ import annotations

import numpy as np

from prep.stats import _per_document


def _by_sorting(seg_len: np.ndarray, seg_doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, inverse, counts = np.unique(seg_doc, return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=seg_len, minlength=len(counts)).astype(np.int64), counts


def test_dense_and_sparse_doc_ids_give_the_sorted_statistics():
    rng = np.random.default_rng(5)
    for spread in (1, 2, 10, 1000):  # dense ids (counted) to far-apart ids (sorted)
        seg_doc = rng.choice(500 * spread, size=500, replace=False).astype(np.int64)
        seg_doc = np.concatenate([seg_doc, seg_doc[:40], seg_doc[:7]])  # some documents in 2 or 3 segments
        rng.shuffle(seg_doc)
        seg_len = rng.integers(1, 1024, len(seg_doc)).astype(np.int32)
        doc_len, segs = _per_document(seg_len, seg_doc)
        want_len, want_segs = _by_sorting(seg_len, seg_doc)
        assert np.array_equal(doc_len, want_len) and np.array_equal(segs, want_segs), spread
        assert doc_len.dtype == np.int64 and int(segs.sum()) == len(seg_doc)
    # Negative control: one segment attributed to another document changes the statistics.
    moved = seg_doc.copy()
    moved[0] = moved[1]
    assert not np.array_equal(_per_document(seg_len, moved)[1], want_segs)


def test_no_segments():
    doc_len, segs = _per_document(np.zeros(0, np.int32), np.zeros(0, np.int64))
    assert len(doc_len) == 0 and len(segs) == 0
