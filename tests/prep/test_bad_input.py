"""Bad input through the `prep pack` CLI: a clear error naming file, record, problem and fix, or a counted skip.

Every case runs as a user runs it (`typer.testing.CliRunner` on `prep.cli.app`). Where `--skip-invalid`
applies, the skip must be counted in the manifest and the card, and documents in must equal documents
accounted for.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from prep.readers import InputFile, jsonl_chunk_lines, jsonl_chunks, read_records
from shared.manifest import Manifest
from tests.prep.clirun import failed_with, run

GOOD = json.dumps({"text": "A small trader reported higher cocoa arrivals this week."})


def pack(tokenizer: Path, out: Path, *inputs: Path | str, extra: tuple[str, ...] = ()):
    return run("pack", *inputs, "--tokenizer", tokenizer, "--out", out, "--seq-len", "64", *extra)


def jsonl(path: Path, *lines: bytes | str) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.arrow"))}


# (case, bad line, message parts, manifest counter under --skip-invalid)
BAD_RECORDS = [
    ("malformed", '{"text": "cut off', ["malformed JSON"], "skipped_invalid"),
    ("missing", '{"body": "x"}', ["no `text` field (fields: body)", "--text-field"], "skipped_missing_field"),
    ("null", '{"text": null}', ["`text` is null"], "skipped_missing_field"),
    ("number", '{"text": 42}', ["`text` is an int, not a string"], "skipped_invalid"),
    ("not-object", '["a", "b"]', ["expected a JSON object, found list"], "skipped_invalid"),
    ("bad-utf8", b'{"text": "caf\xe9"}', ["invalid UTF-8 at byte"], "skipped_invalid"),
    ("surrogate", '{"text": "abc \\ud800 def"}', ["half a UTF-16 surrogate pair"], "skipped_invalid"),
    ("encoded-surrogate", b'{"text": "\xed\xa0\x80"}', ["invalid UTF-8 at byte 10"], "skipped_invalid"),
    ("deep", '{"text": ' + "[" * 100_000 + "}", ["JSON that cannot be decoded"], "skipped_invalid"),
    ("bigint", '{"text": "x", "n": ' + "9" * 5000 + "}", ["cannot be decoded"], "skipped_invalid"),
]


@pytest.mark.parametrize("case,line,parts,counter", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_stops_with_its_location(case, line, parts, counter, sample, tmp_path):
    _, tok = sample
    src = jsonl(tmp_path / f"{case}.jsonl", GOOD, line, GOOD)
    failed_with(pack(tok, tmp_path / "out", src), f"{src}:2: ", *parts, "--skip-invalid")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_every_bad_record_is_counted_with_skip_invalid(sample, tmp_path):
    _, tok = sample
    lines = [GOOD, '{"text": ""}'] + [line for _, line, _, _ in BAD_RECORDS] + [GOOD]
    src = jsonl(tmp_path / "mixed.jsonl", *lines)
    result = pack(tok, tmp_path / "out", src, extra=("--skip-invalid",))
    assert result.exit_code == 0, result.output
    m = Manifest.load(tmp_path / "out")
    d = m.documents
    expected = {"skipped_invalid": 0, "skipped_missing_field": 0}
    for _, _, _, counter in BAD_RECORDS:
        expected[counter] += 1
    assert d.docs_in == len(lines) == m.inputs[0].num_records
    assert (d.packed, d.skipped_empty) == (2, 1)
    assert {k: getattr(d, k) for k in expected} == expected
    assert not d.problems() and m.options.skip_invalid is True
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert f"{len(lines)} == 2 + 0 + {len(lines) - 2}" in card


def test_invalid_utf8_text_file(sample, tmp_path):
    _, tok = sample
    src = tmp_path / "latin1.txt"
    src.write_bytes("Zürich café".encode("latin-1"))
    failed_with(
        pack(tok, tmp_path / "out", src), f"{src}: invalid UTF-8 at byte 1", "iconv", "--skip-invalid"
    )
    good = tmp_path / "good.txt"
    good.write_text("Zurich cafe trade rose.", encoding="utf-8")
    ok = pack(tok, tmp_path / "out", good, src, extra=("--skip-invalid",))
    assert ok.exit_code == 0, ok.output
    docs = Manifest.load(tmp_path / "out").documents
    assert (docs.docs_in, docs.packed, docs.skipped_invalid) == (2, 1, 1)


def test_empty_documents_are_counted_not_packed(sample, tmp_path):
    _, tok = sample
    src = jsonl(tmp_path / "e.jsonl", GOOD, '{"text": ""}', '{"text": "  \\n\\t "}', "", GOOD)
    result = pack(tok, tmp_path / "out", src)
    assert result.exit_code == 0, result.output
    assert "skipped (empty 2" in result.output
    docs = Manifest.load(tmp_path / "out").documents
    # The blank line is not a record; the two empty texts are.
    assert (docs.docs_in, docs.packed, docs.skipped_empty) == (4, 2, 2)
    assert "| 4 | 2 | 0 | 0 | 0 | 2 | 0 | 0 |" in (tmp_path / "out" / "README.md").read_text()


def test_bom_and_crlf_change_nothing(sample, tmp_path):
    corpus, tok = sample
    lines = corpus.read_bytes().splitlines()[:60]
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    variants = {}
    for name, bom, sep in [("bom", True, b"\n"), ("crlf", False, b"\r\n"), ("both", True, b"\r\n")]:
        variants[name] = tmp_path / f"{name}.jsonl"
        variants[name].write_bytes((b"\xef\xbb\xbf" if bom else b"") + sep.join(lines) + sep)

    def texts(path: Path) -> list[str | None]:
        return [r.text for r in read_records(InputFile(path, "jsonl"), "text", lambda n: None)]

    assert all(texts(path) == texts(plain) for path in variants.values())
    assert pack(tok, tmp_path / "a", plain).exit_code == 0
    assert pack(tok, tmp_path / "b", variants["both"]).exit_code == 0
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_bom_in_text_file_is_not_text(sample, tmp_path):
    _, tok = sample
    (tmp_path / "plain.txt").write_bytes(b"The board confirmed the merger talks.")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfThe board confirmed the merger talks.")
    assert pack(tok, tmp_path / "a", tmp_path / "plain.txt").exit_code == 0
    assert pack(tok, tmp_path / "b", tmp_path / "bom.txt").exit_code == 0
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


@pytest.mark.slow
def test_long_document_is_split_and_accounted(sample, tmp_path):
    """A 1 MB single document (the 50 MB case is measured in docs/reliability.md, too slow for the suite)."""
    corpus, tok = sample
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    big = " ".join(texts)
    big = (big * (1_000_000 // len(big) + 1))[:1_000_000]
    src = jsonl(tmp_path / "big.jsonl", GOOD, json.dumps({"text": big}), GOOD)
    result = run("pack", src, "--tokenizer", tok, "--out", tmp_path / "out", "--seq-len", "1024")
    assert result.exit_code == 0, result.output
    docs = Manifest.load(tmp_path / "out").documents
    assert (docs.docs_in, docs.packed, docs.split) == (3, 3, 1)
    assert docs.tokens_packed > 150_000 and not docs.problems()


def test_inputs_that_match_nothing(sample, tmp_path):
    _, tok = sample
    failed_with(pack(tok, tmp_path / "out", str(tmp_path / "*.jsonl")), "matches no files", "quote it")
    failed_with(pack(tok, tmp_path / "out", tmp_path / "nope.jsonl"), "nope.jsonl` does not exist")
    (tmp_path / "data.xml").write_text("text\nhello\n")
    failed_with(pack(tok, tmp_path / "out", tmp_path / "data.xml"), "unsupported type", ".jsonl")
    (tmp_path / "empty_dir").mkdir()
    failed_with(pack(tok, tmp_path / "out", tmp_path / "empty_dir"), "holds no", "saved dataset")


def test_zero_documents(sample, tmp_path):
    _, tok = sample
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    failed_with(pack(tok, tmp_path / "out", empty), "no documents to pack: 0 records read")
    blanks = jsonl(tmp_path / "blanks.jsonl", '{"text": ""}', '{"text": " "}')
    failed_with(pack(tok, tmp_path / "out2", blanks), "2 records read, 2 skipped (empty 2")


def test_unreadable_inputs(sample, tmp_path):
    _, tok = sample
    folder = tmp_path / "looks_like.jsonl"
    folder.mkdir()
    # A folder is walked whatever its name says (tests/prep/test_inputs.py); this one holds nothing to read.
    failed_with(pack(tok, tmp_path / "out", folder), "folder `", "looks_like.jsonl` holds no .jsonl")
    if sys.platform.startswith("linux"):
        # A real read failure that root cannot bypass: reading /proc/self/mem at offset 0 fails with EIO.
        link = tmp_path / "device.jsonl"
        link.symlink_to("/proc/self/mem")
        failed_with(pack(tok, tmp_path / "out2", link), "cannot read", "device.jsonl")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(sample, tmp_path):
    _, tok = sample
    src = jsonl(tmp_path / "locked.jsonl", GOOD)
    src.chmod(0)
    failed_with(pack(tok, tmp_path / "out", src), "permission denied", "locked.jsonl")


def test_bad_tokenizers(sample, tmp_path):
    corpus, tok = sample
    failed_with(pack(tmp_path / "missing", tmp_path / "o", corpus), "missing` does not exist")
    (tmp_path / "not_tok.json").write_text('{"hello": 1}')
    failed_with(
        pack(tmp_path / "not_tok.json", tmp_path / "o", corpus), "is not a Hugging Face tokenizer.json"
    )
    (tmp_path / "binary.json").write_bytes(os.urandom(256))
    failed_with(
        pack(tmp_path / "binary.json", tmp_path / "o", corpus), "is not a Hugging Face tokenizer.json"
    )
    (tmp_path / "model_dir").mkdir()
    failed_with(pack(tmp_path / "model_dir", tmp_path / "o", corpus), "is a folder without a tokenizer.json")


def test_special_tokens_the_tokenizer_lacks(sample, tmp_path):
    corpus, tok = sample
    out = tmp_path / "o"
    failed_with(
        pack(tok, out, corpus, extra=("--eos-token", "</s>")),
        "--eos-token '</s>' is not a token of",
        "<|endoftext|>",
    )
    failed_with(pack(tok, out, corpus, extra=("--bos-token", "<s>")), "--bos-token '<s>' is not a token")
    failed_with(
        pack(tok, out, corpus, extra=("--bos-token", "<|endoftext|>")), "is the EOS token", "distinct BOS"
    )


@pytest.mark.parametrize("seq_len", ["1", "0", "-5"])
def test_seq_len_below_two(seq_len, sample, tmp_path):
    corpus, tok = sample
    result = run("pack", corpus, "--tokenizer", tok, "--out", tmp_path / "o", "--seq-len", seq_len)
    failed_with(result, f"--seq-len {seq_len} is too small", ">= 2")


@pytest.mark.slow
def test_output_folder_rules(sample, tmp_path):
    corpus, tok = sample
    src = jsonl(tmp_path / "in.jsonl", GOOD, GOOD)
    out = tmp_path / "out"
    assert pack(tok, out, src).exit_code == 0
    before = shard_bytes(out)
    failed_with(pack(tok, out, corpus), "already holds a dataset", "--overwrite")
    assert shard_bytes(out) == before, "a refused pack must not touch the dataset"
    (out / "notes.txt").write_text("mine")
    assert pack(tok, out, corpus, extra=("--overwrite",)).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine", "--overwrite removes only what prep pack writes"
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    failed_with(pack(tok, other, src, extra=("--overwrite",)), "non-empty folder that is not a dataset")
    failed_with(pack(tok, tmp_path / "in.jsonl", corpus), "is a file; pass a folder")


def test_bad_parquet_and_json_array_files(sample, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tok = sample
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["A board met.", None, "Prices rose."]}), nulls)
    failed_with(pack(tok, tmp_path / "o", nulls), f"{nulls}:row 1: `text` is null", "--skip-invalid")
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["x"]}), other)
    failed_with(pack(tok, tmp_path / "o", other), "has no `text` column (columns: body); set `--text-field`")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(nulls.read_bytes()[:-20])
    failed_with(pack(tok, tmp_path / "o", cut), f"`{cut}` is not a readable Parquet file")
    array = tmp_path / "docs.json"
    array.write_text('[{"text": "a"}, {"text": ')
    failed_with(pack(tok, tmp_path / "o", array), "is not valid JSON", "convert it to JSON lines")
    ok = pack(tok, tmp_path / "o", nulls, extra=("--skip-invalid",))
    assert ok.exit_code == 0, ok.output
    docs = Manifest.load(tmp_path / "o").documents
    assert (docs.docs_in, docs.packed, docs.skipped_missing_field) == (3, 2, 1)


def test_jsonl_progress_counts_every_byte_in_few_updates(tmp_path):
    path = tmp_path / "many.jsonl"
    lines = [json.dumps({"text": f"document {i} " + "x" * (i % 50)}) for i in range(500)]
    path.write_text(
        "\n".join(lines[:250]) + "\n\n" + "\n".join(lines[250:]), encoding="utf-8"
    )  # a blank line
    reported: list[int] = []
    chunks = list(jsonl_chunks(path, reported.append, size=1000))
    assert sum(len(list(jsonl_chunk_lines(*c))) for c in chunks) == 500
    assert sum(reported) == path.stat().st_size  # blank lines and the unterminated last line included
    assert len(reported) <= 2 * (
        path.stat().st_size // 1000 + 1
    )  # one per chunk of ~1000 bytes, not per line


# A BOM, CRLF, blank and whitespace-only lines, a line longer than a chunk, no newline at the end.
AWKWARD = (
    b"\xef\xbb\xbf"
    + b'{"text": "first"}\r\n\n   \n{"text": "second"}\n'
    + b'{"text": "'
    + b"long " * 60
    + b'"}\n\t\n{"text": "\xc3\xa9t\xc3\xa9"}\nnot json\n{"text": "last"}'
)


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("skip", [0, 1, 3, 9])
@pytest.mark.parametrize("head", [b"", b"\n"], ids=["bom-record", "bom-blank"])
def test_jsonl_chunks_hold_every_record_once_with_its_line_number(tmp_path, size, skip, head):
    data = AWKWARD[:3] + head + AWKWARD[3:]
    path = tmp_path / "awkward.jsonl"
    path.write_bytes(data)
    want = [(n, raw) for n, raw in enumerate(data[3:].split(b"\n"), start=1) if raw.strip()][skip:]
    reported: list[int] = []
    chunks = list(jsonl_chunks(path, reported.append, size=size, skip=skip))
    assert [line for c in chunks for line in jsonl_chunk_lines(*c)] == want
    assert all(chunk.endswith(b"\n") for _, chunk in chunks[:-1])  # whole lines only
    assert sum(reported) == len(data) and len(want) == max(0, 6 - skip)


def test_jsonl_chunks_shrink_toward_the_end_with_spread(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(4000)), encoding="utf-8"
    )
    plain = list(jsonl_chunks(path, lambda n: None, size=16384))
    spread = list(jsonl_chunks(path, lambda n: None, size=16384, spread=2))
    assert b"".join(c for _, c in spread) == path.read_bytes()
    assert [line for c in spread for line in jsonl_chunk_lines(*c)] == [
        line for c in plain for line in jsonl_chunk_lines(*c)
    ]
    sizes = [len(c) for _, c in spread]
    assert sizes[0] > 16384 - 64 and max(sizes[-4:]) <= 16384 // 8 + 64  # whole lines: one more or less
    assert len(spread) > len(plain)


def test_the_tokenizer_and_the_output_folder_are_judged_before_the_inputs(sample, tmp_path):
    """Reading starts before the tokenizer is resolved; its errors still come after those of the tokenizer
    and of --out, and a bad tokenizer never lets --overwrite delete the dataset there."""
    corpus, tok = sample
    out = tmp_path / "out"
    assert pack(tok, out, corpus).exit_code == 0
    bad = tmp_path / "bad.parquet"  # fails as soon as it is opened, while the first jobs are handed out
    bad.write_bytes(b"PAR1 not parquet PAR1")
    failed_with(
        pack(tok, out, bad, extra=("--eos-token", "<|nope|>")), "--eos-token '<|nope|>' is not a token"
    )
    failed_with(pack(tok, out, bad), "already holds a dataset")
    failed_with(pack(tok, out, corpus, extra=("--eos-token", "<|nope|>", "--overwrite")), "is not a token")
    assert (out / "manifest.json").exists()
    failed_with(pack(tok, tmp_path / "new", bad), f"`{bad}` is not a readable Parquet file")


def test_a_bom_at_the_start_of_any_jsonl_line_is_not_part_of_the_record(tmp_path):
    """As json.loads reads bytes; e.g. `cat a.jsonl b.jsonl` where b.jsonl starts with one."""
    path = jsonl(tmp_path / "cat.jsonl", GOOD, "\ufeff" + GOOD)
    records = list(read_records(InputFile(path, "jsonl"), "text", lambda n: None))
    assert [r.problem for r in records] == [None, None] and records[0].text == records[1].text


def test_resuming_reports_the_skipped_bytes_in_few_updates(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5000)), encoding="utf-8"
    )
    reported: list[int] = []
    chunks = list(jsonl_chunks(path, reported.append, size=4096, skip=4000))
    assert [n for c in chunks for n, _ in jsonl_chunk_lines(*c)] == list(range(4001, 5001))
    assert sum(reported) == path.stat().st_size and len(reported) < 2 * path.stat().st_size // 4096 + 4
