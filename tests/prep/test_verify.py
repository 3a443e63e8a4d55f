"""`prep verify`: the untouched sample passes; each invariant, broken in exactly one way, fails with its message.

Every corruption rewrites a shard (read with pyarrow, edit rows as numpy arrays, write a new stream) and,
except for the checksum test, records the new sha256/size in the manifest so that the deeper check is the
one that fires.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.pipeline import PackConfig, pack
from prep.verify import VerifyConfig, verify_dataset
from shared.checks import CHECKS, RowCheckError
from shared.contract import (
    CU_SEQLENS,
    DOC_IDS,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    MANIFEST_NAME,
    POSITION_IDS,
    SHARD_SCHEMA,
    read_schema_metadata,
    schema_with_metadata,
)
from shared.errors import DatasetError, ManifestError, ShardIntegrityError
from shared.fileio import sha256_file

SEQ_LEN = 256
COLUMNS = (INPUT_IDS, LABELS, POSITION_IDS, CU_SEQLENS, DOC_IDS)
Row = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def packed(sample, tmp_path_factory) -> Path:
    """The bundled sample at seq_len 256, 64 rows per shard (several shards, fragmented documents, a val split)."""
    corpus, tok = sample
    out = tmp_path_factory.mktemp("verify") / "packed"
    pack(
        PackConfig(
            inputs=(str(corpus),),
            tokenizer=str(tok),
            out=out,
            seq_len=SEQ_LEN,
            rows_per_shard=64,
            val_fraction=0.05,
        )
    )
    return out


@pytest.fixture
def copy(packed, tmp_path) -> Path:
    dest = tmp_path / "packed"
    shutil.copytree(packed, dest)
    return dest


# --- the corruption helper ---------------------------------------------------------------------------


def read_rows(path: Path) -> tuple[list[Row], pa.Schema]:
    reader = pa.ipc.open_stream(path.read_bytes())
    table = reader.read_all()
    rows = [
        {c: np.array(table.column(c)[i].as_py(), dtype=np.int64) for c in COLUMNS}
        for i in range(table.num_rows)
    ]
    return rows, reader.schema


def write_rows(path: Path, rows: list[Row], schema: pa.Schema) -> None:
    arrays = [pa.array([r[c].tolist() for r in rows], type=SHARD_SCHEMA.field(c).type) for c in COLUMNS]
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))


def last_shard(folder: Path) -> str:
    """The train split's last shard: the one with many short documents per row (long ones fill the first)."""
    return manifest_of(folder)["splits"]["train"]["shards"][-1]["file"]


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def save_manifest(folder: Path, raw: dict) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(raw, indent=2))


def corrupt(
    folder: Path,
    mutate: Callable[[list[Row]], None],
    *,
    file: str | None = None,
    metadata: dict | None = None,
    recount: bool = False,
) -> str:
    """Rewrite one shard with ``mutate`` applied to its rows; record its new sha256/size in the manifest.

    ``metadata`` updates the shard's schema metadata; ``recount`` also rewrites the manifest's counts for
    the shard and its split, so that only a check deeper than the counts can see the damage.
    """
    raw = manifest_of(folder)
    shards = raw["splits"]["train"]["shards"]
    info = next(s for s in shards if s["file"] == file) if file else shards[-1]
    path = folder / info["file"]
    rows, schema = read_rows(path)
    mutate(rows)
    if metadata:
        schema = schema_with_metadata({**read_schema_metadata(schema), **metadata})
    write_rows(path, rows, schema)
    info["sha256"], info["num_bytes"] = sha256_file(path), path.stat().st_size
    if recount:
        eos = raw["tokenizer"]["eos_id"]
        before = {k: info[k] for k in ("num_rows", "num_tokens", "num_segments", "num_docs")}
        info["num_rows"] = len(rows)
        info["num_tokens"] = sum(len(r[INPUT_IDS]) for r in rows)
        info["num_segments"] = sum(len(r[DOC_IDS]) for r in rows)
        info["num_docs"] = sum(int((r[INPUT_IDS][r[CU_SEQLENS][1:] - 1] == eos).sum()) for r in rows)
        split = raw["splits"]["train"]
        for k, old in before.items():
            split[k] += info[k] - old
        split["num_target_tokens"] = split["num_tokens"] - split["num_segments"]
    save_manifest(folder, raw)
    return info["file"]


def fails(folder: Path, *fragments: str, error=RowCheckError, **options) -> str:
    with pytest.raises(error) as caught:
        verify_dataset(VerifyConfig(root=folder, **options))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


def row_with(rows: list[Row], min_segments: int = 1, min_first: int = 1) -> int:
    """Index of the first row with at least ``min_segments`` segments, the first holding ``min_first`` tokens."""
    for i, r in enumerate(rows):
        cu = r[CU_SEQLENS]
        if len(cu) - 1 >= min_segments and cu[1] >= min_first:
            return i
    raise AssertionError("the sample has no such row")


def drop_segment(rows: list[Row], r: int, j: int) -> None:
    """Remove segment ``j`` of row ``r`` (and the row, when that was its only segment)."""
    row = rows[r]
    if len(row[DOC_IDS]) == 1:
        del rows[r]
        return
    cu = row[CU_SEQLENS]
    a, b = int(cu[j]), int(cu[j + 1])
    for c in (INPUT_IDS, LABELS, POSITION_IDS):
        row[c] = np.concatenate([row[c][:a], row[c][b:]])
    row[CU_SEQLENS] = np.concatenate([cu[: j + 1], cu[j + 2 :] - (b - a)])
    row[DOC_IDS] = np.delete(row[DOC_IDS], j)


def fragmented_doc(folder: Path) -> tuple[int, list[tuple[str, int, int]]]:
    """A document stored in three or more segments, with its (file, row, segment) places in storage order."""
    places: dict[int, list[tuple[str, int, int]]] = {}
    for info in manifest_of(folder)["splits"]["train"]["shards"]:
        rows, _ = read_rows(folder / info["file"])
        for i, r in enumerate(rows):
            for j, d in enumerate(r[DOC_IDS].tolist()):
                places.setdefault(d, []).append((info["file"], i, j))
    doc = next(d for d, p in places.items() if len(p) >= 3)
    return doc, places[doc]


# --- the untouched dataset ---------------------------------------------------------------------------


def test_untouched_sample_passes_every_check(packed, sample):
    corpus, _ = sample
    report = verify_dataset(VerifyConfig(root=packed, sources=(str(corpus),), inputs=True))
    assert report.checks == CHECKS
    assert report.skipped == ()
    m = manifest_of(packed)
    assert sum(s.num_docs for s in report.splits) == m["documents"]["packed"]
    assert sum(s.num_tokens for s in report.splits) == m["documents"]["tokens_packed"]
    assert report.splits[0].num_fragmented_docs >= m["documents"]["split"] > 0
    assert report.num_source_records > 0 and report.tokens_per_second > 0


# --- files ---------------------------------------------------------------------------------------------


def test_flipped_byte_fails_the_checksum(copy):
    path = copy / manifest_of(copy)["splits"]["train"]["shards"][1]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fails(copy, path.name, "checksum mismatch", error=ShardIntegrityError)


def test_wrong_shard_format_version_fails(copy):
    name = corrupt(copy, lambda rows: None, metadata={"format_version": 2})
    fails(copy, name, "format_version 2", error=ShardIntegrityError)


def test_wrong_manifest_format_version_fails(copy):
    raw = manifest_of(copy)
    raw["format_version"] = 2
    save_manifest(copy, raw)
    fails(copy, "format_version 2", error=ManifestError)


def test_shard_metadata_from_another_dataset_fails(copy):
    name = corrupt(copy, lambda rows: None, metadata={"seq_len": 512})
    fails(copy, "files check failed", name, "`seq_len` is 512, the manifest says 256")


def test_shard_not_listed_in_the_manifest_fails(copy):
    shutil.copy(copy / last_shard(copy), copy / "train-00099-of-00099.arrow")
    fails(copy, "files check failed", "`train-00099-of-00099.arrow` is not listed in the manifest")


def test_manifest_count_off_by_one_fails(copy):
    raw = manifest_of(copy)
    info = raw["splits"]["train"]["shards"][0]
    info["num_tokens"] += 1
    save_manifest(copy, raw)
    fails(
        copy,
        "files check failed",
        info["file"],
        f"num_tokens = {info['num_tokens']:,}, found {info['num_tokens'] - 1:,}",
    )


# --- rows ----------------------------------------------------------------------------------------------


def test_broken_cu_seqlens_fails(copy):
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_segments=2)

    def mutate(rows):
        rows[r][CU_SEQLENS][1] = rows[r][CU_SEQLENS][2]  # an empty segment

    name = corrupt(copy, mutate)
    fails(copy, "structure check failed", f"shard `{name}`, row {r}", "not strictly increasing")


def test_row_longer_than_seq_len_fails(copy):
    def mutate(rows):
        row = next(x for x in rows if len(x[INPUT_IDS]) == SEQ_LEN)
        for c, extra in ((INPUT_IDS, 5), (LABELS, 5), (POSITION_IDS, row[POSITION_IDS][-1] + 1)):
            row[c] = np.append(row[c], extra)
        row[CU_SEQLENS][-1] += 1

    corrupt(copy, mutate, recount=True)
    fails(copy, "structure check failed", f"has {SEQ_LEN + 1} tokens; expected 1 to seq_len {SEQ_LEN}")


def test_extra_eos_inside_a_document_fails(copy):
    eos = manifest_of(copy)["tokenizer"]["eos_id"]
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_first=4)

    def mutate(rows):
        rows[r][INPUT_IDS][2] = rows[r][LABELS][2] = eos  # labels stay consistent: only the EOS rule breaks

    name = corrupt(copy, mutate)
    fails(
        copy,
        "eos check failed",
        f"shard `{name}`, row {r}, segment 0",
        "token 2 of the segment",
        f"EOS id {eos} before",
    )


def test_position_off_by_one_fails(copy):
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_segments=2)
    seg1 = int(rows[r][CU_SEQLENS][1])

    def mutate(rows):
        rows[r][POSITION_IDS][seg1 + 1] += 1

    corrupt(copy, mutate)
    fails(
        copy,
        "positions check failed",
        f"row {r}, segment 1",
        "token 1 of the segment",
        "position_ids is 2, expected 1",
    )


def test_position_not_restarting_at_segment_start_fails(copy):
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_segments=2)

    def mutate(rows):
        rows[r][POSITION_IDS] = np.arange(len(rows[r][POSITION_IDS]))  # one running count across documents

    corrupt(copy, mutate)
    fails(copy, "positions check failed", f"row {r}, segment 1", "token 0 of the segment", "expected 0")


def test_first_token_label_left_as_target_fails(copy):
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_segments=2)
    seg1 = int(rows[r][CU_SEQLENS][1])

    def mutate(rows):
        rows[r][LABELS][seg1] = rows[r][INPUT_IDS][seg1]

    corrupt(copy, mutate)
    fails(
        copy,
        "labels check failed",
        f"row {r}, segment 1",
        "token 0 of the segment",
        "expected -100",
        "previous document",
    )


def test_masked_eos_label_fails(copy):
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_segments=2)
    end0 = int(rows[r][CU_SEQLENS][1]) - 1

    def mutate(rows):
        rows[r][LABELS][end0] = IGNORE_INDEX

    corrupt(copy, mutate)
    fails(copy, "labels check failed", f"row {r}, segment 0", "the EOS is masked")


def test_literal_special_token_id_inside_a_document_fails(copy, sample):
    _, tok_dir = sample
    im_start = json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"][1]
    assert im_start["content"] == "<|im_start|>"
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_first=4)

    def mutate(rows):
        rows[r][INPUT_IDS][2] = rows[r][LABELS][2] = im_start["id"]

    corrupt(copy, mutate)
    fails(
        copy,
        "special check failed",
        f"row {r}, segment 0",
        f"special-token id {im_start['id']} inside a document",
    )


def test_special_token_check_is_reported_as_skipped_without_a_tokenizer(copy):
    raw = manifest_of(copy)
    raw["tokenizer"]["path"] = str(copy / "gone")
    save_manifest(copy, raw)
    report = verify_dataset(VerifyConfig(root=copy))
    assert "special" not in report.checks
    assert any(s.startswith("special tokens") for s in report.skipped)


# --- documents -----------------------------------------------------------------------------------------


def test_missing_last_fragment_fails_as_a_document_without_eos(copy):
    doc, places = fragmented_doc(copy)
    file, r, j = places[-1]
    corrupt(copy, lambda rows: drop_segment(rows, r, j), file=file, recount=True)
    fails(copy, "eos check failed", f"document {doc} has no EOS")


def test_missing_first_fragment_fails_the_document_accounting(copy):
    doc, places = fragmented_doc(copy)
    file, r, j = places[0]
    corrupt(copy, lambda rows: drop_segment(rows, r, j), file=file, recount=True)
    fails(copy, "documents check failed", "tokens are stored, the manifest says", "a fragment is missing")


def test_document_with_two_segments_in_one_row_fails(copy):
    eos = manifest_of(copy)["tokenizer"]["eos_id"]
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_segments=2)
    end0 = int(rows[r][CU_SEQLENS][1]) - 1
    doc = int(rows[r][DOC_IDS][0])

    def mutate(rows):
        # Documents 0 and 1 of the row become one document cut in two: no EOS between, one doc_id.
        row = rows[r]
        row[INPUT_IDS][end0] = row[LABELS][end0] = eos + 5
        row[DOC_IDS][1] = doc

    corrupt(copy, mutate, recount=True)
    fails(
        copy, "documents check failed", f"document {doc} has two segments in one row", f"row {r}, segment 0"
    )


def test_accounting_that_does_not_add_up_fails(copy):
    raw = manifest_of(copy)
    raw["documents"]["docs_in"] += 1
    save_manifest(copy, raw)
    fails(copy, "documents check failed", "docs_in")


# --- tokenizer and sources -------------------------------------------------------------------------


def test_other_tokenizer_fails_the_fingerprint(copy, sample, tmp_path):
    _, tok_dir = sample
    other = tmp_path / "other"
    shutil.copytree(tok_dir, other)
    with open(other / "tokenizer.json", "a") as f:
        f.write("\n")  # same tokenizer, different bytes: the fingerprint is of the file
    fails(copy, "tokenizer check failed", "fingerprint", tokenizer=str(other))


def test_sources_that_differ_from_the_shards_fail(copy, sample, tmp_path):
    corpus, _ = sample
    lines = corpus.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[3])
    record["text"] = record["text"].replace(" ", "  ", 1)
    lines[3] = json.dumps(record)
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fails(
        copy,
        "sources check failed",
        "doc_id 3",
        "first difference at token",
        sources=(str(changed),),
        sample=400,
    )


def test_documents_in_the_wrong_split_fail(copy, sample):
    corpus, _ = sample
    raw = manifest_of(copy)
    raw["options"]["val_fraction"] = 0.5  # the shards were split at 0.05
    save_manifest(copy, raw)
    fails(copy, "sources check failed", "with val_fraction 0.5 puts it in", sources=(str(corpus),))


def test_sources_with_a_record_missing_fail(copy, sample, tmp_path):
    corpus, _ = sample
    lines = corpus.read_text(encoding="utf-8").splitlines()
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("\n".join(lines[:-2] + lines[-1:]) + "\n", encoding="utf-8")
    fails(copy, "sources check failed", "holds 400 records", "401", sources=(str(shorter),))


# --- the command line ----------------------------------------------------------------------------------


def test_cli_verify_passes_and_prints_the_summary(packed, sample):
    corpus, tok = sample
    result = CliRunner().invoke(
        app, ["verify", str(packed), "--tokenizer", str(tok), "--source", str(corpus)]
    )
    assert result.exit_code == 0, result.output
    assert "all checks hold" in result.output and "sources" in result.output
    assert "tok/s" in result.output


def test_cli_verify_fails_with_exit_code_and_message(copy):
    rows, _ = read_rows(copy / last_shard(copy))
    r = row_with(rows, min_segments=2)

    def mutate(rows):
        rows[r][POSITION_IDS][3] += 1

    corrupt(copy, mutate)
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "error:" in result.output and "positions check failed" in result.output
    assert "Traceback" not in result.output


def test_cli_verify_on_a_folder_without_manifest(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "no manifest.json" in result.output


def test_errors_are_user_errors():
    assert issubclass(RowCheckError, DatasetError)


@pytest.mark.corpus
def test_reuters_slice_passes_with_sources(reuters, qwen_tokenizer, tmp_path):
    """Real text and the Qwen2.5 tokenizer: the first 1,000 Reuters records, checked against their source."""
    lines = reuters.read_text(encoding="utf-8").splitlines(keepends=True)[:1000]
    corpus = tmp_path / "reuters-slice.jsonl"
    corpus.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "packed"
    pack(PackConfig(inputs=(str(corpus),), tokenizer=str(qwen_tokenizer), out=out, seq_len=512))
    report = verify_dataset(
        VerifyConfig(root=out, tokenizer=str(qwen_tokenizer), sources=(str(corpus),), sample=300)
    )
    assert "special" in report.checks and "sources" in report.checks
    assert report.num_source_records >= 300


# --- other packing options -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_bos(sample, tmp_path_factory) -> Path:
    """Wrapped rows, BOS before every document, long documents dropped."""
    corpus, tok = sample
    out = tmp_path_factory.mktemp("verify-bos") / "packed"
    pack(
        PackConfig(
            inputs=(str(corpus),),
            tokenizer=str(tok),
            out=out,
            seq_len=SEQ_LEN,
            strategy="wrapped",
            long_docs="drop",
            bos_token="<|im_start|>",
        )
    )
    return out


@pytest.mark.slow
def test_truncated_documents_pass_with_sources(sample, tmp_path):
    corpus, tok = sample
    out = tmp_path / "packed"
    pack(
        PackConfig(inputs=(str(corpus),), tokenizer=str(tok), out=out, seq_len=SEQ_LEN, long_docs="truncate")
    )
    report = verify_dataset(VerifyConfig(root=out, sources=(str(corpus),), sample=401))
    assert "sources" in report.checks and report.num_source_records == 401


def test_wrapped_bos_and_dropped_documents_pass_with_sources(packed_bos, sample):
    corpus, _ = sample
    report = verify_dataset(VerifyConfig(root=packed_bos, sources=(str(corpus),), sample=401))
    assert "sources" in report.checks and report.num_source_records == 401
    assert manifest_of(packed_bos)["documents"]["dropped"] > 0


def test_bos_inside_a_document_fails(packed_bos, tmp_path):
    out = tmp_path / "packed"
    shutil.copytree(packed_bos, out)
    bos = manifest_of(out)["tokenizer"]["bos_id"]
    rows, _ = read_rows(out / last_shard(out))
    r = row_with(rows, min_first=4)

    def mutate(rows):
        rows[r][INPUT_IDS][2] = rows[r][LABELS][2] = bos

    corrupt(out, mutate)
    fails(out, "eos check failed", f"row {r}, segment 0", f"BOS id {bos} after the start of its segment")
