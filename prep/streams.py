"""One batch's token streams (BOS? + ids + EOS per document), with the long-document policy applied.

Vectorised over the whole batch: the tokenizer hands over one flat id array and per-document lengths,
and this turns them into the bytes appended to the token store, without a Python list per document.
For documents ``a`` (2 ids), ``b`` (4 ids) with ``seq_len=4``, no BOS::

    ids        a0 a1 b0 b1 b2 b3
    split      a0 a1 EOS | b0 b1 b2 b3 EOS      (b stays whole; packing cuts it into fragments)
    truncate   a0 a1 EOS | b0 b1 b2 EOS
    drop       a0 a1 EOS
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prep.fast_bpe import EncodedBatch


@dataclass(frozen=True, slots=True)
class BatchStreams:
    tokens: np.ndarray
    """int32, the kept documents' streams back to back."""
    kept: np.ndarray
    """int64, index (among the batch's encoded documents) of each kept document."""
    doc_len: np.ndarray
    """int64, stream length of each kept document."""
    counts: dict[str, int]
    """Increments of the manifest's document accounting for this batch."""


def build_streams(
    encoded: EncodedBatch, *, bos_id: int | None, eos_id: int, seq_len: int, long_docs: str
) -> BatchStreams:
    """Streams of every encoded document under ``long_docs`` (``split``, ``truncate`` or ``drop``)."""
    num_extra = 1 + (bos_id is not None)
    full_len = encoded.lengths + num_extra
    is_long = full_len > seq_len
    keep = ~is_long if long_docs == "drop" else np.ones(len(full_len), dtype=bool)
    out_len = np.minimum(full_len, seq_len) if long_docs == "truncate" else full_len
    out_len = out_len[keep]
    counts = {
        "tokens_in": int(full_len.sum()),
        "packed": int(keep.sum()),
        "tokens_packed": int(out_len.sum()),
        "split": int(is_long.sum()) if long_docs == "split" else 0,
        "truncated": int(is_long.sum()) if long_docs == "truncate" else 0,
        "tokens_truncated": int((full_len - seq_len)[is_long].sum()) if long_docs == "truncate" else 0,
        "dropped": int(is_long.sum()) if long_docs == "drop" else 0,
        "tokens_dropped": int(full_len[is_long].sum()) if long_docs == "drop" else 0,
    }

    # Which ids survive: the first `num_content` of each kept document (all of them unless truncated).
    num_content = np.where(keep, np.minimum(full_len, seq_len if long_docs == "truncate" else full_len), 0)
    num_content = np.maximum(num_content - num_extra, 0)
    doc_start = np.cumsum(encoded.lengths) - encoded.lengths
    within = np.arange(len(encoded.ids), dtype=np.int64) - np.repeat(doc_start, encoded.lengths)
    content = encoded.ids[within < np.repeat(num_content, encoded.lengths)]

    tokens = np.empty(int(out_len.sum()), dtype=np.int32)
    ends = np.cumsum(out_len)
    starts = ends - out_len
    is_content = np.ones(len(tokens), dtype=bool)
    if bos_id is not None:
        tokens[starts] = bos_id
        is_content[starts] = False
    tokens[ends - 1] = eos_id
    is_content[ends - 1] = False
    tokens[is_content] = content
    return BatchStreams(
        tokens=tokens,
        kept=np.flatnonzero(keep).astype(np.int64),
        doc_len=out_len.astype(np.int64),
        counts=counts,
    )
