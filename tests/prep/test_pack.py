"""`prep pack` end to end: documents -> shards -> documents, on the bundled sample and the real corpora."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.pipeline import PackConfig, pack
from prep.readers import is_val
from prep.tokenizer import load_tokenizer
from shared.contract import SHARD_SCHEMA
from shared.reader import PackedDataset
from tests.prep.rowcheck import check_dataset


def _texts(jsonl: Path) -> list[str]:
    return [json.loads(line)["text"] for line in jsonl.read_text(encoding="utf-8").splitlines()]


def _assert_round_trip(streams: dict[int, np.ndarray], texts: list[str], tokenizer, bos_id=None) -> None:
    """Each stored document, without BOS/EOS, is exactly the document tokenized alone."""
    tok = load_tokenizer(tokenizer)
    wanted = {i: t for i, t in enumerate(texts) if t.strip()}
    assert set(streams) == set(wanted)
    ids = wanted.keys()
    encoded = tok.encode_batch([wanted[i] for i in ids])
    for doc, expected in zip(ids, encoded, strict=True):
        stream = streams[doc]
        body = stream[1:-1] if bos_id is not None else stream[:-1]
        assert body.tolist() == expected, f"doc {doc} differs from its own tokenization"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
@pytest.mark.parametrize("seq_len", [64, 1024])
def test_sample_round_trip(sample, tmp_path, strategy, seq_len):
    corpus, tokenizer = sample
    m = pack(
        PackConfig(
            inputs=(str(corpus),),
            tokenizer=str(tokenizer),
            out=tmp_path / "out",
            seq_len=seq_len,
            strategy=strategy,
        )
    )
    special = load_tokenizer(tokenizer).special_ids()
    streams = check_dataset(tmp_path / "out", special_ids=special)
    _assert_round_trip(streams, _texts(corpus), tokenizer)
    assert m.documents.skipped_empty == 1
    assert m.documents.tokens_packed == m.splits["train"].num_tokens


@pytest.mark.slow
def test_bos_and_val_split(sample, tmp_path):
    corpus, tokenizer = sample
    m = pack(
        PackConfig(
            inputs=(str(corpus),),
            tokenizer=str(tokenizer),
            out=tmp_path / "out",
            seq_len=128,
            bos_token="<|im_start|>",
            val_fraction=0.2,
        )
    )
    streams = check_dataset(tmp_path / "out")
    _assert_round_trip(streams, _texts(corpus), tokenizer, bos_id=m.tokenizer.bos_id)
    texts = _texts(corpus)
    val_docs = {int(d) for row in PackedDataset(tmp_path / "out").split("val") for d in row.doc_ids}
    assert val_docs == {i for i, t in enumerate(texts) if t.strip() and is_val(t, 0.2)}
    assert 0.1 < len(val_docs) / m.documents.packed < 0.3


@pytest.mark.slow
def test_val_split_follows_content_not_order(sample, tmp_path):
    corpus, tokenizer = sample
    texts = [t for t in _texts(corpus) if t.strip()]
    shuffled = tmp_path / "shuffled.jsonl"
    order = np.random.default_rng(0).permutation(len(texts))
    shuffled.write_text("".join(json.dumps({"text": texts[i]}) + "\n" for i in order))
    for name, src in (("a", corpus), ("b", shuffled)):
        pack(PackConfig(inputs=(str(src),), tokenizer=str(tokenizer), out=tmp_path / name, val_fraction=0.3))

    def val_texts(folder: Path, source_texts: list[str]) -> set[str]:
        return {source_texts[int(d)] for row in PackedDataset(folder).split("val") for d in row.doc_ids}

    assert val_texts(tmp_path / "a", _texts(corpus)) == val_texts(tmp_path / "b", [texts[i] for i in order])


@pytest.mark.slow
def test_literal_special_tokens_are_text(sample, tmp_path):
    _, tokenizer = sample
    doc = tmp_path / "doc.jsonl"
    doc.write_text(
        json.dumps({"text": "before <|endoftext|> middle <|im_start|>user after<|im_end|>"}) + "\n"
    )
    m = pack(PackConfig(inputs=(str(doc),), tokenizer=str(tokenizer), out=tmp_path / "out"))
    row = PackedDataset(tmp_path / "out").split("train").row(0)
    assert (row.input_ids == m.tokenizer.eos_id).sum() == 1
    assert row.input_ids[-1] == m.tokenizer.eos_id
    assert not np.isin(row.input_ids[:-1], load_tokenizer(tokenizer).special_ids()).any()


def test_literal_special_tokens_are_text_qwen(qwen_tokenizer, tmp_path):
    doc = tmp_path / "doc.jsonl"
    doc.write_text(json.dumps({"text": "a <|endoftext|> b <|im_start|>system c"}) + "\n")
    pack(PackConfig(inputs=(str(doc),), tokenizer=str(qwen_tokenizer.parent), out=tmp_path / "out"))
    ids = PackedDataset(tmp_path / "out").split("train").row(0).input_ids
    assert ids[-1] == 151643 and (ids == 151643).sum() == 1
    assert 151644 not in ids


@pytest.mark.slow
def test_output_is_deterministic(sample, tmp_path):
    corpus, tokenizer = sample
    for name in ("a", "b"):
        pack(
            PackConfig(
                inputs=(str(corpus),),
                tokenizer=str(tokenizer),
                out=tmp_path / name,
                seq_len=96,
                val_fraction=0.1,
                rows_per_shard=50,
            )
        )
    # The card names its folder in the commands it prints; shards and manifest must not differ at all.
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix in (".arrow", ".json"))
    assert len([f for f in files if f.endswith(".arrow")]) > 2 and "manifest.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow
def test_datasets_from_file_matches_pyarrow(sample, tmp_path):
    corpus, tokenizer = sample
    pack(PackConfig(inputs=(str(corpus),), tokenizer=str(tokenizer), out=tmp_path / "out", seq_len=256))
    shard = next((tmp_path / "out").glob("train-*.arrow"))
    table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
    assert table.schema.remove_metadata().equals(SHARD_SCHEMA)
    hf = datasets.Dataset.from_file(str(shard))
    assert hf.num_rows == table.num_rows
    for i in (0, table.num_rows // 2, table.num_rows - 1):
        assert hf[i] == {name: table.column(name)[i].as_py() for name in table.column_names}


@pytest.mark.slow
def test_input_formats_give_the_same_documents(sample, tmp_path):
    corpus, tokenizer = sample
    texts = [t for t in _texts(corpus)[:40] if t.strip()]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    array_json = tmp_path / "b.json"
    array_json.write_text(json.dumps([{"body": t} for t in texts]))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": texts}), parquet)
    text_dir = tmp_path / "txt"
    text_dir.mkdir()
    for i, t in enumerate(texts):
        (text_dir / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(saved))

    rows = {}
    for name, inputs in {
        "jsonl": [str(jsonl)],
        "json": [str(array_json)],
        "parquet": [str(parquet)],
        "text": [str(text_dir / "*.txt")],
        "saved": [str(saved)],
    }.items():
        field = "body"
        m = pack(
            PackConfig(
                inputs=tuple(inputs), tokenizer=str(tokenizer), out=tmp_path / f"out-{name}", text_field=field
            )
        )
        assert m.documents.packed == len(texts), name
        rows[name] = [r.input_ids.tolist() for r in PackedDataset(tmp_path / f"out-{name}").split("train")]
    reference = rows.pop("jsonl")
    for name, got in rows.items():
        assert got == reference, name


@pytest.mark.slow
def test_many_inputs_number_documents_in_input_order(sample, tmp_path):
    corpus, tokenizer = sample
    texts = [t for t in _texts(corpus) if t.strip()][:30]
    for k in range(3):
        (tmp_path / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[k * 10 : k * 10 + 10])
        )
    m = pack(
        PackConfig(inputs=(str(tmp_path / "part-*.jsonl"),), tokenizer=str(tokenizer), out=tmp_path / "out")
    )
    assert [(i.first_doc_id, i.num_records) for i in m.inputs] == [(0, 10), (10, 10), (20, 10)]
    streams = check_dataset(tmp_path / "out")
    _assert_round_trip(streams, texts, tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_long_document_policies(sample, tmp_path, policy):
    corpus, tokenizer = sample
    seq_len = 64
    m = pack(
        PackConfig(
            inputs=(str(corpus),),
            tokenizer=str(tokenizer),
            out=tmp_path / "out",
            seq_len=seq_len,
            long_docs=policy,
        )
    )
    streams = check_dataset(tmp_path / "out")
    lengths = [
        len(ids) + 1
        for ids in load_tokenizer(tokenizer).encode_batch([t for t in _texts(corpus) if t.strip()])
    ]
    num_long = sum(n > seq_len for n in lengths)
    assert num_long > 10
    d = m.documents
    assert d.split == 0
    if policy == "truncate":
        assert d.truncated == num_long and d.dropped == 0 and len(streams) == len(lengths)
        assert d.tokens_truncated == sum(n - seq_len for n in lengths if n > seq_len)
    else:
        assert d.dropped == num_long and d.truncated == 0 and len(streams) == len(lengths) - num_long
    # Under truncate/drop no document is ever split across segments.
    assert all(len(s) <= seq_len for s in streams.values())
    rows = PackedDataset(tmp_path / "out").split("train")
    assert sum(r.num_segments for r in rows) == len(streams)


@pytest.mark.slow
def test_cli_pack_and_refuse_existing_output(sample, tmp_path):
    corpus, tokenizer = sample
    runner = CliRunner()
    args = [
        "pack",
        str(corpus),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(tmp_path / "out"),
        "--seq-len",
        "128",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "packed" in result.output and (tmp_path / "out" / "manifest.json").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.corpus
@pytest.mark.slow
@pytest.mark.parametrize("corpus_name", ["reuters", "ectsum"])
def test_real_corpus_round_trip(request, corpus_name, qwen_tokenizer, tmp_path):
    """Every row of the real corpus packed at 1024 holds the contract; every document comes back exactly."""
    corpus = request.getfixturevalue(corpus_name)
    m = pack(PackConfig(inputs=(str(corpus),), tokenizer=str(qwen_tokenizer), out=tmp_path / "out"))
    streams = check_dataset(tmp_path / "out", special_ids=load_tokenizer(qwen_tokenizer).special_ids())
    _assert_round_trip(streams, _texts(corpus), qwen_tokenizer)
    train = m.splits["train"]
    lower = -(-train.num_tokens // m.seq_len)
    assert train.num_docs == m.documents.packed == sum(1 for t in _texts(corpus) if t.strip())
    assert train.num_rows <= lower * 1.001, (train.num_rows, lower)
    assert m.documents.tokens_packed == m.documents.tokens_in  # split loses no token
