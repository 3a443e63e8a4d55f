"""`-` as an input: JSON lines from standard input, streamed, fingerprinted while read, packed to the bytes
the same records give from a file; what cannot work with a pipe (`--resume`, Ray, reading it twice) is
refused with the fix."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.cli import app
from shared.fileio import sha256_file
from tests.prep import clirun
from tests.prep.clirun import ok, run

failed_with = partial(clirun.failed_with, flat=True)


def pack_args(tok: Path, out: Path, *inputs: str | Path) -> list[str]:
    return ["pack", *map(str, inputs), "--tokenizer", str(tok), "--out", str(out), "--seq-len", "128"]


@pytest.fixture(scope="module")
def from_file(sample, tmp_path_factory) -> Path:
    corpus, tok = sample
    out = tmp_path_factory.mktemp("stdin") / "file"
    ok(run(*pack_args(tok, out, corpus)))
    return out


def same_as_file(out: Path, from_file: Path, corpus: Path) -> None:
    """The shards are the file's bytes; the manifest names `-`, with the file's size and sha256, no mtime."""
    shards = sorted(p.name for p in from_file.glob("*.arrow"))
    assert shards == sorted(p.name for p in out.glob("*.arrow"))
    for name in shards:
        assert (out / name).read_bytes() == (from_file / name).read_bytes(), name
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, from_file))
    [info] = got["inputs"]
    expected = {**want["inputs"][0], "path": "-"}
    del expected["mtime_ns"]
    assert info == expected
    assert info["sha256"] == sha256_file(corpus) and info["num_bytes"] == corpus.stat().st_size
    got["inputs"], want["inputs"] = [], []
    assert got == want


@pytest.mark.slow
def test_stdin_through_a_pipe_packs_the_files_bytes(sample, from_file, tmp_path):
    corpus, tok = sample
    out = tmp_path / "out"
    with open(corpus, "rb") as f:
        done = subprocess.run(
            [sys.executable, "-c", "from prep.cli import main; main()", *pack_args(tok, out, "-")],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr + done.stdout
    same_as_file(out, from_file, corpus)
    assert "reading 1 input file: -" in done.stdout + done.stderr


@pytest.mark.slow
def test_stdin_through_the_cli_runner(sample, from_file, tmp_path):
    corpus, tok = sample
    out = tmp_path / "out"
    result = CliRunner().invoke(app, pack_args(tok, out, "-"), input=corpus.read_bytes())
    ok(result)
    same_as_file(out, from_file, corpus)
    card = (out / "README.md").read_text()
    assert "| `-` | jsonl |" in card and "--source -" not in card


@pytest.mark.slow
@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_stdin_is_known_by_its_magic_bytes(sample, from_file, tmp_path, compress):
    """A pipe has no name: `cat a.jsonl.gz | prep pack -` is read decompressed, the shards are the plain
    file's bytes, and the manifest fingerprints the bytes that came through the pipe (compressed)."""
    corpus, tok = sample
    piped = compress(corpus.read_bytes())
    out = tmp_path / "out"
    ok(CliRunner().invoke(app, pack_args(tok, out, "-"), input=piped))
    for shard in from_file.glob("*.arrow"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    [info] = json.loads((out / "manifest.json").read_text())["inputs"]
    assert (info["sha256"], info["num_bytes"]) == (hashlib.sha256(piped).hexdigest(), len(piped))


@pytest.mark.slow
def test_a_bad_record_on_stdin_is_named_by_line(sample, tmp_path):
    _, tok = sample
    result = CliRunner().invoke(app, pack_args(tok, tmp_path / "out", "-"), input=b'{"text": "a"}\n{oops\n')
    failed_with(result, "<stdin>:2: malformed JSON")
    assert "Standard input (`-`) is read as JSON lines" not in result.output  # one bad record, not the format


@pytest.mark.slow
def test_another_format_on_stdin_says_what_stdin_reads(sample, tmp_path):
    _, tok = sample
    result = CliRunner().invoke(app, pack_args(tok, tmp_path / "out", "-"), input=b"id,text\n1,hello\n")
    failed_with(
        result, "<stdin>:1: malformed JSON", "Standard input (`-`) is read as JSON lines", "save another"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-", "--resume"], "`--resume` cannot continue a pack that reads standard input"),
        (["-", "--executor", "ray"], "`--executor ray` cannot read standard input"),
        (["-", "-"], "input `-` (standard input) is given twice"),
    ],
)
def test_what_a_pipe_cannot_do_is_refused(sample, tmp_path, extra, message):
    _, tok = sample
    result = CliRunner().invoke(app, pack_args(tok, tmp_path / "out", *extra), input=b'{"text": "a"}\n')
    failed_with(result, message)


def test_verify_cannot_read_stdin_again(from_file):
    failed_with(run("verify", from_file, "--source", "-"), "standard input cannot be compared")
