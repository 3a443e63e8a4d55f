"""CSV/TSV inputs and dotted field paths: the same records as plain JSON lines pack to the same shards."""

from __future__ import annotations

import csv
import gzip
import json
from functools import partial
from pathlib import Path

from prep.readers import InputFile, read_records
from tests.prep import clirun
from tests.prep.clirun import ok, run

TEXTS = [f'document {i}, with a comma, a "quote" and\na newline.' * (1 + i % 5) for i in range(60)]

# Messages wrap at the console's width: parts are matched with whitespace runs as one space.
failed_with = partial(clirun.failed_with, flat=True)


def pack(tok: Path, out: Path, *inputs: str | Path, extra: tuple[str, ...] = ()):
    return run(
        "pack", *inputs, "--tokenizer", tok, "--out", out, "--seq-len", "64", "--val-fraction", "0.1", *extra
    )


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.arrow"))}


def plain_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return path


def write_table(path: Path, delimiter: str) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", "body", "lang"])
        writer.writerows([i, t, "en"] for i, t in enumerate(TEXTS))
    return path


def test_csv_tsv_and_compressed_csv_pack_to_the_plain_jsonl_bytes(sample, tmp_path):
    _, tok = sample
    ok(pack(tok, tmp_path / "plain", plain_jsonl(tmp_path)))
    table = write_table(tmp_path / "t.csv", ",")
    gz = tmp_path / "t2.csv.gz"
    gz.write_bytes(gzip.compress(table.read_bytes()))
    for path in (table, write_table(tmp_path / "t.tsv", "\t"), gz):
        out = tmp_path / f"out-{path.name}"
        ok(pack(tok, out, path, extra=("--text-field", "body")))
        assert shards(out) == shards(tmp_path / "plain"), path
        ok(run("verify", out, "--tokenizer", tok, "--source", path))


def test_csv_without_the_column_names_the_columns(sample, tmp_path):
    _, tok = sample
    table = write_table(tmp_path / "t.csv", ",")
    failed_with(
        pack(tok, tmp_path / "o", table), f"`{table}` has no `text` column (columns: id, body, lang);"
    )


def test_bad_csv_rows_are_bad_records_with_their_line(sample, tmp_path):
    _, tok = sample
    table = tmp_path / "bad.csv"
    table.write_bytes(b'id,text\n1,good one\n2,too,many\n3,"\xff not utf-8"\n\n4,\n5,also good\n')
    records = list(read_records(InputFile(table, "csv"), "text", lambda n: None))
    assert [(r.where.rsplit(":", 1)[1], r.problem) for r in records] == [
        ("2", None),
        ("3", "invalid"),
        ("4", "invalid"),
        ("6", "empty"),
        ("7", None),
    ]
    assert records[1].detail == "3 fields, the header has 2"
    failed_with(pack(tok, tmp_path / "o", table), f"{table}:3", "3 fields, the header has 2")
    output = ok(pack(tok, tmp_path / "o2", table, extra=("--skip-invalid",)))
    assert "invalid 2" in " ".join(output.split())


def test_dotted_field_paths_read_nested_records_as_plain_jsonl(sample, tmp_path):
    _, tok = sample
    ok(pack(tok, tmp_path / "plain", plain_jsonl(tmp_path)))
    nested = tmp_path / "nested.jsonl"
    nested.write_text(
        "".join(json.dumps({"id": i, "content": {"body": t}}) + "\n" for i, t in enumerate(TEXTS)),
        encoding="utf-8",
    )
    ok(pack(tok, tmp_path / "out", nested, extra=("--text-field", "content.body")))
    assert shards(tmp_path / "out") == shards(tmp_path / "plain")
    # Negative controls: a path that stops early, or runs into a string, names where it stopped.
    failed_with(
        pack(tok, tmp_path / "o2", nested, extra=("--text-field", "content.title")),
        "no `content.title` field: content has no `title` (fields: body); set `--text-field`",
    )
    failed_with(
        pack(tok, tmp_path / "o3", nested, extra=("--text-field", "content.body.x")),
        "`content.body` is a str, not an object with `x`",
    )


def test_a_key_holding_the_dots_wins_over_the_path(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"a.b": "literal", "a": {"b": "nested"}}) + "\n", encoding="utf-8")
    assert [r.text for r in read_records(InputFile(path, "jsonl"), "a.b", lambda n: None)] == ["literal"]
