"""Property tests of the packer: random length distributions, seq_lens and options; every invariant, every token.

Plans (`prep/packing.py`) and their materialisation (`prep/writer.py` ``build_batch``) are tested directly on
synthetic token streams, which is fast enough for many examples. A few end-to-end packs with the bundled
sample tokenizer then check the whole pipeline, through the independent reading in ``rowcheck.py``.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prep.packing import make_plan
from prep.pipeline import PackConfig, pack
from prep.tokenizer import load_tokenizer
from prep.writer import TokenStore, build_batch
from shared.contract import IGNORE_INDEX
from tests.prep.rowcheck import check_dataset

EOS, BOS = 1, 2


@st.composite
def corpora(draw) -> tuple[list[int], int]:
    """(document stream lengths, seq_len): mostly short, mostly long, or a mix with a heavy tail."""
    seq_len = draw(st.integers(2, 300))
    shape = draw(st.sampled_from(["short", "long", "mixed", "exact"]))
    if shape == "short":
        length = st.integers(1, max(1, seq_len // 4))
    elif shape == "long":
        length = st.integers(seq_len // 2 + 1, 4 * seq_len)
    elif shape == "exact":
        length = st.sampled_from([seq_len - 1, seq_len, seq_len + 1, 2 * seq_len]).filter(lambda n: n > 0)
    else:
        length = st.one_of(st.integers(1, seq_len), st.integers(1, 6 * seq_len))
    lengths = draw(st.lists(length, min_size=1, max_size=120))
    return lengths, seq_len


def check_plan(plan, doc_len: np.ndarray, seq_len: int, strategy: str, allow_fragments: bool) -> None:
    rows = plan.row_lengths()
    assert plan.row_ptr[0] == 0 and plan.row_ptr[-1] == len(plan.seg_len)
    assert np.all(np.diff(plan.row_ptr) > 0), "an empty row"
    assert np.all(plan.seg_len > 0), "an empty segment"
    assert np.all((rows > 0) & (rows <= seq_len)), "a row longer than seq_len"
    assert plan.num_tokens == int(doc_len.sum()), "tokens lost or duplicated"
    assert plan.num_rows >= -(-int(doc_len.sum()) // seq_len), "fewer rows than the lower bound"
    # Each document's segments, in storage order, are consecutive slices covering its stream exactly once.
    next_start = np.zeros(len(doc_len), dtype=np.int64)
    seg_row = np.repeat(np.arange(plan.num_rows), np.diff(plan.row_ptr))
    seen: set[tuple[int, int]] = set()
    for doc, start, length, row in zip(plan.seg_doc, plan.seg_start, plan.seg_len, seg_row, strict=True):
        assert start == next_start[doc], f"doc {doc}: fragment out of order or overlapping"
        next_start[doc] += length
        assert (doc, row) not in seen, f"doc {doc} has two segments in row {row}"
        seen.add((doc, row))
    assert np.array_equal(next_start, doc_len), "a document not fully placed"
    if strategy == "wrapped":
        assert np.all(rows[:-1] == seq_len), "wrapped rows must be full except the last"
        assert np.all(np.diff(plan.seg_doc) >= 0), "wrapped keeps input order"
    if not allow_fragments:
        assert len(plan.seg_len) == len(doc_len), "a document was cut although splitting is off"


def synthetic_store(doc_len: np.ndarray, rng: np.random.Generator, bos: bool) -> TokenStore:
    """Streams of random ids (never EOS/BOS) that end in EOS and, with ``bos``, start with BOS."""
    total = int(doc_len.sum())
    tokens = rng.integers(3, 50_000, size=total, dtype=np.int32)
    offset = np.concatenate([[0], np.cumsum(doc_len)[:-1]]).astype(np.int64)
    tokens[offset + doc_len - 1] = EOS
    if bos:
        tokens[offset[doc_len > 1]] = BOS
    doc_id = np.sort(rng.choice(10 * len(doc_len), size=len(doc_len), replace=False)).astype(np.int64)
    return TokenStore(tokens=tokens, doc_offset=offset, doc_len=doc_len.astype(np.int64), doc_id=doc_id)


def check_batch_contract(store: TokenStore, plan, seq_len: int) -> None:
    """Every row obeys the shard contract, and the rows give back every document's stream exactly."""
    batch = build_batch(store, plan, 0, plan.num_rows)
    pieces: dict[int, list[np.ndarray]] = defaultdict(list)
    for r in range(batch.num_rows):
        ids = np.asarray(batch.column("input_ids")[r].values)
        labels = np.asarray(batch.column("labels")[r].values)
        pos = np.asarray(batch.column("position_ids")[r].values)
        cu = np.asarray(batch.column("cu_seqlens")[r].values)
        docs = np.asarray(batch.column("doc_ids")[r].values)
        assert 0 < len(ids) <= seq_len and len(labels) == len(pos) == len(ids)
        assert cu[0] == 0 and cu[-1] == len(ids) and np.all(np.diff(cu) > 0) and len(docs) == len(cu) - 1
        for j, doc in enumerate(docs.tolist()):
            seg = slice(int(cu[j]), int(cu[j + 1]))
            assert np.array_equal(pos[seg], np.arange(cu[j + 1] - cu[j])), "positions must restart"
            assert labels[seg][0] == IGNORE_INDEX, "a segment's first token predicted across a boundary"
            assert np.array_equal(labels[seg][1:], ids[seg][1:]), "labels are the unshifted ids"
            pieces[doc].append(ids[seg])
    assert sorted(pieces) == sorted(store.doc_id.tolist()), "a document is missing from the rows"
    for k, doc in enumerate(store.doc_id.tolist()):
        lo = store.doc_offset[k]
        stream = np.concatenate(pieces[doc])
        assert np.array_equal(stream, store.tokens[lo : lo + store.doc_len[k]]), f"doc {doc} changed"
        assert (stream == EOS).sum() == 1 and stream[-1] == EOS, f"doc {doc}: one EOS, at its end"


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora(), st.sampled_from(["bfd", "wrapped"]), st.booleans(), st.integers(0, 2**32 - 1))
def test_plans_keep_every_invariant(corpus, strategy, bos, seed):
    lengths, seq_len = corpus
    doc_len = np.array(lengths, dtype=np.int64)
    plan = make_plan(strategy, doc_len, seq_len)
    check_plan(plan, doc_len, seq_len, strategy, allow_fragments=True)
    check_batch_contract(synthetic_store(doc_len, np.random.default_rng(seed), bos), plan, seq_len)


@settings(max_examples=60, deadline=None)
@given(corpora())
def test_bfd_without_splitting_keeps_documents_whole(corpus):
    # --long-docs truncate|drop: every stream is at most seq_len by the time it is planned.
    lengths, seq_len = corpus
    doc_len = np.minimum(np.array(lengths, dtype=np.int64), seq_len)
    plan = make_plan("bfd", doc_len, seq_len, allow_fragments=False)
    check_plan(plan, doc_len, seq_len, "bfd", allow_fragments=False)


def test_the_checks_catch_broken_plans_and_rows():
    """Negative controls: a lost token, fragments out of order, a second EOS inside a document."""
    doc_len = np.array([5, 9, 3, 12], dtype=np.int64)
    plan = make_plan("bfd", doc_len, 8)
    lost = type(plan)(plan.seg_doc, plan.seg_start, plan.seg_len.copy(), plan.row_ptr)
    lost.seg_len[0] -= 1
    swapped = type(plan)(plan.seg_doc, plan.seg_start[::-1].copy(), plan.seg_len, plan.row_ptr)
    for broken in (lost, swapped):
        with pytest.raises(AssertionError):
            check_plan(broken, doc_len, 8, "bfd", allow_fragments=True)
    store = synthetic_store(doc_len, np.random.default_rng(0), bos=False)
    store.tokens[store.doc_offset[1] + 2] = EOS
    with pytest.raises(AssertionError, match="one EOS"):
        check_batch_contract(store, plan, 8)


WORDS = [
    "the",
    "board",
    "reported",
    "cocoa",
    "arrivals",
    "in",
    "Z\u00fcrich",
    "<|endoftext|>",
    "4.2",
    ";",
    "\n",
]


@st.composite
def documents(draw) -> list[str]:
    """Texts from one word to a few thousand, some empty; a literal EOS string appears as text."""
    n = draw(st.integers(1, 25))
    lengths = draw(st.lists(st.one_of(st.integers(0, 30), st.integers(100, 2500)), min_size=n, max_size=n))
    seed = draw(st.integers(0, 1000))
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=k)) for k in lengths]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=documents(),
    seq_len=st.sampled_from([16, 64, 257]),
    strategy=st.sampled_from(["bfd", "wrapped"]),
    long_docs=st.sampled_from(["split", "truncate", "drop"]),
    bos=st.booleans(),
)
@pytest.mark.slow
def test_end_to_end_pack_accounts_for_every_token(
    docs, seq_len, strategy, long_docs, bos, sample, tmp_path_factory
):
    _, tok_dir = sample
    folder = tmp_path_factory.mktemp("prop")
    src = folder / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    bos_token = "<|im_start|>" if bos else None
    tok = load_tokenizer(tok_dir, bos_token=bos_token)
    expected = {}
    for i, text in enumerate(docs):
        if not text.strip():
            continue
        stream = ([tok.bos_id] if bos else []) + tok.encode_batch([text])[0] + [tok.eos_id]
        if len(stream) > seq_len and long_docs == "drop":
            continue
        if len(stream) > seq_len and long_docs == "truncate":
            stream = stream[: seq_len - 1] + [tok.eos_id]
        expected[i] = stream
    if not expected:
        return  # nothing to pack: test_bad_input covers the error
    cfg = PackConfig(
        inputs=(str(src),),
        tokenizer=str(tok_dir),
        out=folder / "out",
        seq_len=seq_len,
        strategy=strategy,
        long_docs=long_docs,
        bos_token=bos_token,
        rows_per_shard=7,
    )
    manifest = pack(cfg)
    d = manifest.documents
    assert d.docs_in == len(docs) and not d.problems()
    stored = check_dataset(folder / "out", special_ids=tok.special_ids())
    assert sorted(stored) == sorted(expected)
    for i, stream in expected.items():
        assert stored[i].tolist() == stream, f"doc {i} differs from its tokenization"
