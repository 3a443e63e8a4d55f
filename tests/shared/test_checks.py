"""shared.checks on hand-built rows: the contract's own example passes; the known packing bugs each fail."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from shared.checks import RowCheckError, SplitSegments, TokenRules, check_batch, check_documents
from shared.contract import IGNORE_INDEX, SHARD_SCHEMA

EOS = 0
RULES = TokenRules(seq_len=8, eos_id=EOS, vocab_size=100, special_ids=(1,))
A = [10, 11, 12, EOS]  # document A: 3 tokens + EOS
B = [20, 21, EOS]


def batch(ids, labels, positions, cu, docs) -> pa.RecordBatch:
    columns = [ids, labels, positions, cu, docs]
    return pa.RecordBatch.from_arrays(
        [pa.array([c], type=f.type) for c, f in zip(columns, SHARD_SCHEMA, strict=True)], schema=SHARD_SCHEMA
    )


def good() -> list[list[int]]:
    """The row drawn in shared/contract.py: A | B."""
    return [
        A + B,
        [IGNORE_INDEX, 11, 12, EOS, IGNORE_INDEX, 21, EOS],
        [0, 1, 2, 3, 0, 1, 2],
        [0, 4, 7],
        [5, 6],
    ]


def fails(columns, check: str, *fragments: str) -> None:
    with pytest.raises(RowCheckError) as caught:
        check_batch(batch(*columns), RULES, shard="s.arrow")
    assert caught.value.check == check
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_the_contract_example_passes():
    segs = check_batch(batch(*good()), RULES, shard="s.arrow")
    assert segs.length.tolist() == [4, 3] and segs.doc_id.tolist() == [5, 6]
    assert segs.ends_with_eos.tolist() == [True, True] and segs.num_target_tokens == 5
    check_documents(SplitSegments.concat(["s.arrow"], [(0, segs)]), has_bos=False)


def test_padding_with_eos_fails():
    ids, labels, pos, cu, docs = good()
    pad = 1
    columns = [ids + [EOS] * pad, labels + [IGNORE_INDEX] * pad, pos + [3], [0, 4, 8], docs]
    fails(columns, "eos", "row 0, segment 1", "EOS id 0 before the end of its segment")


def test_positions_restarting_on_the_eos_fail():
    ids, labels, _, cu, docs = good()
    fails([ids, labels, [0, 1, 2, 0, 0, 1, 0], cu, docs], "positions", "segment 0", "token 3")


def test_first_token_predicted_from_the_previous_document_fails():
    ids, labels, pos, cu, docs = good()
    labels[4] = ids[4]
    fails([ids, labels, pos, cu, docs], "labels", "segment 1", "expected -100")


def test_literal_separator_tokenized_as_control_token_fails():
    ids, labels, pos, cu, docs = good()
    ids[1] = labels[1] = 1
    fails([ids, labels, pos, cu, docs], "special", "special-token id 1")


def test_cu_seqlens_not_ending_at_the_row_length_fails():
    ids, labels, pos, _, docs = good()
    fails([ids, labels, pos, [0, 4, 6], docs], "structure", "cu_seqlens runs from 0 to 6")


def test_document_without_eos_fails_across_batches():
    first = check_batch(batch([10, 11], [IGNORE_INDEX, 11], [0, 1], [0, 2], [9]), RULES, shard="a.arrow")
    segs = SplitSegments.concat(["a.arrow"], [(0, first)])
    with pytest.raises(RowCheckError, match="document 9 has no EOS"):
        check_documents(segs, has_bos=False)


def test_fragments_across_rows_pass_and_an_eos_before_the_last_fails():
    head = check_batch(
        batch([10] * 8, [IGNORE_INDEX] + [10] * 7, list(range(8)), [0, 8], [3]), RULES, shard="a"
    )
    tail = check_batch(
        batch([10, EOS], [IGNORE_INDEX, EOS], [0, 1], [0, 2], [3]), RULES, shard="a", row_base=1
    )
    check_documents(SplitSegments.concat(["a"], [(0, head), (0, tail)]), has_bos=False)
    with pytest.raises(RowCheckError, match="document 3 has no EOS"):  # fragments out of order
        check_documents(SplitSegments.concat(["a"], [(0, tail), (0, head)]), has_bos=False)
    with pytest.raises(RowCheckError, match="document 3 has more than one EOS"):
        check_documents(SplitSegments.concat(["a"], [(0, tail), (0, tail)]), has_bos=False)


def test_checks_never_import_torch():
    import subprocess
    import sys

    code = "import sys, shared.checks; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_row_lengths_are_vectorised_per_batch():
    rows = 50
    ids = np.tile(np.array(A, dtype=np.int32), (rows, 1))
    labels = ids.copy()
    labels[:, 0] = IGNORE_INDEX
    pos = np.tile(np.arange(4, dtype=np.int32), (rows, 1))
    big = pa.RecordBatch.from_arrays(
        [
            pa.array(ids.tolist(), type=SHARD_SCHEMA.field(0).type),
            pa.array(labels.tolist(), type=SHARD_SCHEMA.field(1).type),
            pa.array(pos.tolist(), type=SHARD_SCHEMA.field(2).type),
            pa.array([[0, 4]] * rows, type=SHARD_SCHEMA.field(3).type),
            pa.array([[i] for i in range(rows)], type=SHARD_SCHEMA.field(4).type),
        ],
        schema=SHARD_SCHEMA,
    )
    segs = check_batch(big, RULES, shard="big", row_base=100)
    assert segs.row.tolist() == list(range(100, 150)) and segs.length.sum() == 4 * rows
