"""An independent, deliberately plain reading of the shard contract, for tests of the packer.

It shares no code with `prep verify` so that a bug in one is caught by the other.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from shared.contract import IGNORE_INDEX
from shared.reader import PackedDataset


def check_dataset(root, *, special_ids=()) -> dict[int, np.ndarray]:
    """Assert every invariant on every row; return each document's stored token stream (EOS included)."""
    ds = PackedDataset(root, verify="checksum")
    m = ds.manifest
    eos, bos, seq_len = m.tokenizer.eos_id, m.tokenizer.bos_id, m.seq_len
    streams: dict[int, list[np.ndarray]] = defaultdict(list)
    finished: set[int] = set()
    for split in ds.split_names:
        info = m.splits[split]
        num_tokens = num_targets = num_docs = 0
        for row in ds.split(split):
            n = row.num_tokens
            assert 0 < n <= seq_len
            assert len(row.labels) == len(row.position_ids) == n
            cu = row.cu_seqlens
            assert cu[0] == 0 and cu[-1] == n and np.all(np.diff(cu) > 0)
            assert len(row.doc_ids) == len(cu) - 1
            for j, doc in enumerate(row.doc_ids.tolist()):
                seg = slice(int(cu[j]), int(cu[j + 1]))
                ids, labels, pos = row.input_ids[seg], row.labels[seg], row.position_ids[seg]
                assert np.array_equal(pos, np.arange(len(ids))), f"positions of doc {doc}"
                assert labels[0] == IGNORE_INDEX, f"first label of doc {doc} is a target"
                assert np.array_equal(labels[1:], ids[1:]), f"labels of doc {doc}"
                assert doc not in finished, f"doc {doc} continues after its EOS"
                num_eos = int((ids == eos).sum())
                if num_eos:
                    assert num_eos == 1 and ids[-1] == eos, f"doc {doc}: EOS not only at the end"
                    finished.add(doc)
                    num_docs += 1
                if bos is not None:
                    assert (ids == bos).sum() == (0 if streams[doc] else 1)
                    assert streams[doc] or ids[0] == bos
                for special in special_ids:
                    if special not in (eos, bos):
                        assert special not in ids, f"doc {doc} holds special id {special}"
                streams[doc].append(ids)
            num_tokens += n
            num_targets += int((row.labels != IGNORE_INDEX).sum())
        assert (num_tokens, num_targets, num_docs) == (info.num_tokens, info.num_target_tokens, info.num_docs)
    assert finished == set(streams), f"documents without EOS: {sorted(set(streams) - finished)[:5]}"
    assert len(finished) == m.documents.packed
    assert not m.documents.problems()
    return {doc: np.concatenate(parts) for doc, parts in streams.items()}
