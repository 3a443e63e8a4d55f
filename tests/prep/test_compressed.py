"""Compressed inputs: read as their name says, checked against their magic bytes, packed to the same bytes.

Every compression is compared with the plain file it was made from: the shards must be byte-identical and
the manifest may differ only in the input's path and fingerprint (that of the file on disk, compressed). Each name/magic check has its negative control.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
from functools import partial
from pathlib import Path

import pytest

from prep.compressed import InputStream, check_name_and_magic
from prep.discovery import discover_inputs
from prep.readers import jsonl_chunks
from tests.prep import clirun
from tests.prep.clirun import ok, run
from tests.prep.fingerprints import provenance_apart

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}

# Messages wrap at the console's width: parts are matched with whitespace runs as one space.
failed_with = partial(clirun.failed_with, flat=True)


def pack(tok: Path, out: Path, *inputs: str | Path):
    return run("pack", *inputs, "--tokenizer", tok, "--out", out, "--seq-len", "128", "--val-fraction", "0.1")


def compressed_copy(plain: Path, folder: Path, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (plain.name + suffix)
    path.write_bytes(COMPRESS[suffix](plain.read_bytes()))
    return path


def same_pack(plain_out: Path, out: Path, plain: Path, packed: Path) -> None:
    """The shards are the same bytes; the manifest differs only in the input's path."""
    shards = sorted(p.name for p in plain_out.glob("*.arrow"))
    assert shards and shards == sorted(p.name for p in out.glob("*.arrow"))
    for name in shards:
        assert (plain_out / name).read_bytes() == (out / name).read_bytes(), name
    expected = (
        (plain_out / "manifest.json").read_text().replace(json.dumps(str(plain)), json.dumps(str(packed)))
    )
    assert provenance_apart(out / "manifest.json", [packed]) == provenance_apart(expected, [plain])


@pytest.mark.parametrize("suffix", sorted(COMPRESS))
def test_compressed_jsonl_packs_to_the_same_bytes_and_verifies(suffix, sample, tmp_path):
    corpus, tok = sample
    ok(pack(tok, tmp_path / "plain", corpus))
    packed = compressed_copy(corpus, tmp_path / "in", suffix)
    ok(pack(tok, tmp_path / "out", packed))
    same_pack(tmp_path / "plain", tmp_path / "out", corpus, packed)
    ok(run("verify", tmp_path / "out", "--tokenizer", tok, "--source", packed, "--sample", "50"))


@pytest.mark.parametrize("name", ["docs.json", "doc.txt"])
def test_compressed_json_array_and_text_pack_as_the_plain_file(name, sample, tmp_path):
    _, tok = sample
    plain = tmp_path / name
    if name.endswith(".json"):
        plain.write_text(json.dumps([{"text": f"document number {i}."} for i in range(30)]), encoding="utf-8")
    else:
        plain.write_text("one text file is one document.\n" * 40, encoding="utf-8")
    ok(pack(tok, tmp_path / "plain", plain))
    packed = compressed_copy(plain, tmp_path / "in", ".gz")
    ok(pack(tok, tmp_path / "out", packed))
    same_pack(tmp_path / "plain", tmp_path / "out", plain, packed)


def test_compressed_files_in_folders_are_read_and_archives_still_ignored(sample, tmp_path):
    corpus, _ = sample
    folder = tmp_path / "corpus"
    packed = compressed_copy(corpus, folder, ".gz")
    (folder / "notes.tar.gz").write_bytes(gzip.compress(b"an archive"))
    (folder / "t.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    (folder / "old.zip").write_bytes(b"PK\x03\x04")
    (folder / "README.md.gz").write_bytes(gzip.compress(b"# notes"))
    for spec in (folder, folder / "*"):
        found = discover_inputs([str(spec)])
        assert [(str(f.path), f.format) for f in found.files] == [(str(packed), "jsonl")]
        reasons = {i.path: i.reason for i in found.ignored}
        assert reasons[str(folder / "notes.tar.gz")].startswith(
            "compressed (.gz) .tar, a type prep pack does"
        )
        assert "Parquet compresses its own pages" in reasons[str(folder / "t.parquet.gz")]
        assert reasons[str(folder / "old.zip")].startswith("compressed (.zip); unpack it")
        assert reasons[str(folder / "README.md.gz")].startswith("documentation")


def test_a_name_that_the_magic_bytes_contradict_is_an_error(sample, tmp_path):
    corpus, tok = sample
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(corpus.read_bytes())
    hidden = tmp_path / "hidden.jsonl"
    hidden.write_bytes(gzip.compress(corpus.read_bytes()))
    wrong = tmp_path / "wrong.jsonl.xz"
    wrong.write_bytes(bz2.compress(corpus.read_bytes()))
    failed_with(
        pack(tok, tmp_path / "o1", fake),
        f"input `{fake}` is named as gzip (.gz) but does not start with its magic bytes. Rename it",
    )
    failed_with(
        pack(tok, tmp_path / "o2", hidden),
        f"input `{hidden}` is gzip-compressed but its name does not end in .gz. Rename it to"
        " `hidden.jsonl.gz`",
    )
    failed_with(pack(tok, tmp_path / "o3", wrong), "is named as xz (.xz) but starts like a bzip2 file")
    failed_with(pack(tok, tmp_path / "o4", tmp_path), "is named as gzip (.gz)")  # met in a folder, too
    # Negative controls: a text that begins like a bzip2 header, and an empty .gz, are what their names say.
    bzh = tmp_path / "bzh.txt"
    bzh.write_bytes(b"BZh9 is how a bzip2 stream starts, but this is text.")
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(b"")
    assert check_name_and_magic(bzh) is None and check_name_and_magic(empty) == ".gz"


def test_zst_without_zstandard_names_the_install(sample, tmp_path, monkeypatch):
    _, tok = sample
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(20))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # an import of it now fails, installed or not
    failed_with(
        pack(tok, tmp_path / "out", path),
        f"input `{path}` is zstd-compressed, and reading .zst needs the `zstandard` module:"
        f" `pip install zstandard`, or unpack it (`unzstd {path}`).",
    )


def test_zst_packs_as_the_plain_file_when_zstandard_is_there(sample, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    corpus, tok = sample
    ok(pack(tok, tmp_path / "plain", corpus))
    packed = tmp_path / "in" / "sample.jsonl.zst"
    packed.parent.mkdir()
    packed.write_bytes(zstandard.ZstdCompressor().compress(corpus.read_bytes()))
    ok(pack(tok, tmp_path / "out", packed))
    same_pack(tmp_path / "plain", tmp_path / "out", corpus, packed)


def test_a_damaged_compressed_file_is_an_error_naming_it(sample, tmp_path):
    corpus, tok = sample
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(corpus.read_bytes())[:-200])
    failed_with(
        pack(tok, tmp_path / "out", cut),
        f"`{cut}` cannot be decompressed (EOFError:",
        "it is damaged or cut short. Compress it again from the original, or pass the uncompressed file.",
    )


def test_chunks_of_a_compressed_file_are_those_of_the_plain_file_and_progress_adds_up(sample, tmp_path):
    corpus, _ = sample
    packed = compressed_copy(corpus, tmp_path, ".xz")
    for skip in (0, 37):
        plain_bytes, packed_bytes = [], []
        plain = list(jsonl_chunks(corpus, plain_bytes.append, size=3000, skip=skip, spread=2))
        got = list(jsonl_chunks(packed, packed_bytes.append, size=3000, skip=skip, spread=2))
        # Line numbers and the concatenated bytes agree; chunk edges may differ (sized on an estimate).
        assert b"".join(c for _, c in got) == b"".join(c for _, c in plain)
        assert got[0][0] == plain[0][0]
        assert sum(plain_bytes) == corpus.stat().st_size and sum(packed_bytes) == packed.stat().st_size
        assert min(packed_bytes) >= 0
    with InputStream(packed) as f:
        assert f.read() == corpus.read_bytes() and f.consumed() == packed.stat().st_size
