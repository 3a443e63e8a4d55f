"""Provenance: every input's size, mtime and sha256 in the manifest, hashed while it is read, and
`prep verify --inputs` comparing them with the inputs as they are now.

Each format's fingerprint is checked against `sha256_file` of the bytes on disk (compressed as stored; a
saved dataset's Arrow files in sorted order). The crash-resume tests (tests/prep/test_crash_resume.py) check
that a resumed run still fingerprints the whole file, also when it resumes inside a gzip stream.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep.compressed import InputStream
from prep.provenance import InputDigest
from prep.readers import InputFile, read_records
from prep.verify import VerifyConfig, check_inputs, verify_dataset
from shared.errors import UserError
from shared.fileio import sha256_file
from shared.manifest import Manifest
from tests.prep import clirun
from tests.prep.clirun import ok, run

failed_with = partial(clirun.failed_with, flat=True)
TEXTS = ["first document", "second, with a comma", "third\nwith a newline", "fourth " * 2000]


def write_inputs(folder: Path) -> dict[str, Path]:
    """The same records in every format read from a file, some compressed; each file's name says its format."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    files = {
        "jsonl": ("a.jsonl", lines),
        "jsonl.gz": ("a.jsonl.gz", gzip.compress(lines)),
        "json": ("b.json", json.dumps([{"text": t} for t in TEXTS]).encode()),
        "json.bz2": ("b.json.bz2", bz2.compress(json.dumps([{"text": t} for t in TEXTS]).encode())),
        "text": ("c.txt", TEXTS[3].encode()),
    }
    paths = {}
    for key, (name, data) in files.items():
        (folder / name).write_bytes(data)
        paths[key] = folder / name
    with open(folder / "d.csv", "w", newline="", encoding="utf-8") as f:
        f.write("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    paths["csv"] = folder / "d.csv"
    pq.write_table(pa.table({"text": TEXTS * 30}), folder / "e.parquet", row_group_size=16)
    paths["parquet"] = folder / "e.parquet"
    return paths


def fingerprint_of(source: InputFile) -> tuple[int, int | None, str, int]:
    digest = InputDigest()
    num_records = sum(1 for _ in read_records(source, "text", lambda n: None, digest))
    fp = digest.fingerprint(source.path)
    return fp.num_bytes, fp.mtime_ns, fp.sha256, num_records


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json.bz2", "text", "csv", "parquet"])
def test_each_format_is_fingerprinted_as_its_file_on_disk(tmp_path, kind):
    path = write_inputs(tmp_path)[kind]
    fmt = {"jsonl.gz": "jsonl", "json.bz2": "json"}.get(kind, kind)
    num_bytes, mtime_ns, sha256, num_records = fingerprint_of(InputFile(path, fmt))
    assert num_records == (1 if kind == "text" else len(TEXTS) * (30 if kind == "parquet" else 1))
    st = path.stat()
    assert (num_bytes, mtime_ns, sha256) == (st.st_size, st.st_mtime_ns, sha256_file(path))


def test_saved_dataset_is_fingerprinted_by_its_arrow_files(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    ds = datasets.Dataset.from_dict({"text": TEXTS * 5})
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(
        str(folder), num_shards={"train": 2, "test": 1}
    )
    arrow = sorted((folder / "train").rglob("*.arrow"))
    assert len(arrow) == 2
    num_bytes, mtime_ns, sha256, num_records = fingerprint_of(InputFile(folder, "arrow-dataset", "train"))
    whole = hashlib.sha256(b"".join(p.read_bytes() for p in arrow)).hexdigest()
    assert num_records == len(TEXTS) * 5
    assert (num_bytes, mtime_ns, sha256) == (
        sum(p.stat().st_size for p in arrow),
        max(p.stat().st_mtime_ns for p in arrow),
        whole,
    )


def test_a_reader_that_stops_short_still_fingerprints_the_whole_file(tmp_path):
    """The rest of the file is hashed when the stream closes: bytes after the end of the gzip member
    (another, empty member), and a file read only in part."""
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "x"}\n') + gzip.compress(b""))
    digest = InputDigest()
    with InputStream(path, digest) as f:
        f.read(3)
    assert digest.fingerprint(path).sha256 == sha256_file(path)


def test_a_file_that_grows_while_read_is_an_error(tmp_path):
    """Negative control: the size on disk when opened must be the bytes hashed."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n')
    digest = InputDigest()
    with InputStream(path, digest) as f:
        f.read(4)
        with open(path, "a") as g:
            g.write('{"text": "two"}\n')
    with pytest.raises(UserError, match="changed while being read"):
        digest.fingerprint(path)


def pack(tok: Path, out: Path, *inputs: Path):
    return run("pack", *inputs, "--tokenizer", tok, "--out", out, "--seq-len", "64")


@pytest.mark.slow
def test_manifest_records_every_input_and_verify_inputs_compares_them(sample, tmp_path, monkeypatch):
    _, tok = sample
    monkeypatch.chdir(tmp_path)  # the manifest's paths are as given: relative, here
    paths = write_inputs(Path("in"))
    inputs = [paths[k] for k in ("jsonl.gz", "csv", "parquet")]
    ok(pack(tok, Path("out"), *inputs))
    raw = json.loads(Path("out/manifest.json").read_text())
    for info, path in zip(raw["inputs"], inputs, strict=True):
        st = path.stat()
        assert info["path"] == str(path)
        assert (info["num_bytes"], info["mtime_ns"], info["sha256"]) == (
            st.st_size,
            st.st_mtime_ns,
            sha256_file(path),
        )
    assert (
        "sha256" in Path("out/README.md").read_text()
        and sha256_file(inputs[0]) in Path("out/README.md").read_text()
    )

    untouched = ok(run("verify", "out", "--inputs"))
    assert "documents, inputs" in " ".join(untouched.split())
    assert "inputs' fingerprints" in verify_dataset(VerifyConfig(root=Path("out"))).skipped[-1]

    # Touched: the same bytes with another modification time is a note, not a failure.
    os.utime(inputs[1], ns=(0, 0))
    assert any("same bytes, a different modification time" in n for n in check_inputs(Manifest.load("out")))

    # Negative control: one byte changed, the size kept; then a file gone.
    data = bytearray(inputs[1].read_bytes())
    data[-3] ^= 1
    inputs[1].write_bytes(bytes(data))
    failed_with(
        run("verify", "out", "--inputs"),
        "inputs check failed: inputs changed since packing:",
        f"`{inputs[1]}` is {len(data):,} bytes with sha256",
    )
    inputs[0].unlink()
    with pytest.raises(UserError, match=f"`{inputs[0]}` is gone"):
        check_inputs(Manifest.load("out"))
