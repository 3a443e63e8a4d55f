"""Faults users cause, as users meet them: an `error:` line with the fix, no traceback, and where the work can
resume, `--resume` finishes it byte-identically.

A full disk is simulated: every file `prep pack` opens for writing (the journal's data files through
`prep.journal`, shards, journal, manifest and card through `shared.fileio`) shares one budget of free bytes,
and the write that passes it writes what fits and raises ENOSPC, as a real disk does. (A real one, a 2 MB
tmpfs, gave the same messages; docs/reliability.md.) A worker killed by the out-of-memory killer is a
worker that SIGKILLs itself through the PREP_TEST_KILL_AT hook.
"""

from __future__ import annotations

import builtins
import errno
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep import encoder
from prep import journal as journal_module
from prep.cli import app
from shared import fileio
from shared.manifest import Manifest
from tests.prep import test_crash_resume as crash
from tests.prep.test_crash_resume import SMALL_BATCH, folder_bytes, pack_args, resume_in_process, run_cli

inputs = crash.inputs  # the crash tests' four input files and their uninterrupted run, as fixtures here
reference = crash.reference


class Disk:
    """Files opened for writing share ``free`` bytes (None: unlimited); ``writes`` lists (file, bytes written
    before), one per write call, to aim a fault at one write."""

    def __init__(self, free: int | None = None) -> None:
        self.free = free
        self.written = 0
        self.writes: list[tuple[str, int]] = []

    def open(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        return _Limited(f, Path(file).name, self) if any(c in mode for c in "wa+") else f


class _Limited:
    def __init__(self, f, name: str, disk: Disk) -> None:
        self._f, self._name, self._disk = f, name, disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._disk.writes.append((self._name, self._disk.written))
        room = len(view) if self._disk.free is None else self._disk.free - self._disk.written
        if len(view) > room:
            self._f.write(view[: max(room, 0)])
            self._disk.written += max(room, 0)
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.written += len(view)
        return self._f.write(view)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def pack_on(disk: Disk, args: list[str], monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(encoder, "BATCH_CHARS", SMALL_BATCH)
        m.setattr(fileio, "open", disk.open, raising=False)
        m.setattr(journal_module, "open", disk.open, raising=False)
        return CliRunner().invoke(app, args)


def flat(result) -> str:
    return " ".join(result.output.split())


def error_line(result, *parts: str) -> None:
    assert result.exit_code == 1, result.output
    assert "\nerror:" in "\n" + result.output and "Traceback" not in result.output, result.output
    for part in parts:
        assert part in flat(result), f"{part!r} not in {flat(result)!r}"


@pytest.fixture(scope="module")
def writes(inputs, tmp_path_factory) -> list[tuple[str, int]]:
    """Every write of an uninterrupted run: (file, bytes written before it)."""
    disk = Disk()
    out = tmp_path_factory.mktemp("count") / "out"
    with pytest.MonkeyPatch.context() as m:
        assert pack_on(disk, pack_args(inputs, out), m).exit_code == 0
    return disk.writes


@pytest.mark.parametrize(
    ("target", "nth"),
    [
        ("tokens.bin", 12),
        (".train-", 3),
        (".manifest.json", 1),
        ("tokens.bin", 1),
        ("doc_len.bin", 5),
        (".journal.json", 7),
        (".val-", 1),
    ],
)
@pytest.mark.slow
def test_disk_full_anywhere_resumes_byte_identical(
    target, nth, inputs, reference, writes, tmp_path, monkeypatch
):
    """ENOSPC in the token store, a journal commit, a shard or the manifest: after freeing space,
    `--resume` gives the bytes of a run that never failed."""
    at = [written for name, written in writes if name.startswith(target)][nth - 1]
    out = tmp_path / "out"
    full = pack_on(Disk(free=at + 10), pack_args(inputs, out), monkeypatch)
    error_line(
        full, "no space left on the disk holding --out", "free", "--resume", "no finished work is lost"
    )
    assert not (out / "manifest.json").exists()
    resume_in_process(pack_args(inputs, out, "--resume"), monkeypatch)
    assert folder_bytes(out) == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(reference), "work folder or temp files left"


@pytest.mark.slow
def test_disk_full_says_what_the_shards_still_need(inputs, writes, tmp_path, monkeypatch):
    at = [written for name, written in writes if name.startswith(".train-")][0]
    full = pack_on(Disk(free=at + 10), pack_args(inputs, tmp_path / "out"), monkeypatch)
    error_line(full, "the run needs about", "more to finish")
    tokenizing = [written for name, written in writes if name == "tokens.bin"][2]
    early = pack_on(Disk(free=tokenizing + 10), pack_args(inputs, tmp_path / "early"), monkeypatch)
    error_line(early, "free)")  # the total is not known while tokenizing: no guess
    assert "needs about" not in flat(early)


@pytest.mark.slow
def test_disk_full_at_the_card_leaves_a_complete_dataset(inputs, reference, writes, tmp_path, monkeypatch):
    at = [written for name, written in writes if name.startswith(".card_lengths")][0]
    out = tmp_path / "out"
    full = pack_on(Disk(free=at + 10), pack_args(inputs, out), monkeypatch)
    error_line(full, f"the dataset in `{out}` is complete", f"run `prep card {out}`")
    Manifest.load(out)
    assert CliRunner().invoke(app, ["card", str(out)]).exit_code == 0
    assert folder_bytes(out) == reference


@pytest.mark.slow
@pytest.mark.parametrize("case", ["file-in-the-way", "read-only", "proc"])
def test_out_that_cannot_be_written(case, inputs, tmp_path, monkeypatch):
    if case == "file-in-the-way":
        (tmp_path / "some_file").write_text("x")
        out, parts = tmp_path / "some_file" / "sub", [f"`{tmp_path / 'some_file'}` is a file, not a folder"]
    elif case == "proc":
        out, parts = Path("/proc/packed"), ["cannot write to --out `/proc/packed`: No such file or directory"]
    else:  # root ignores permissions: a read-only disk is what the kernel reports, EROFS
        out, parts = tmp_path / "ro", ["cannot write to --out", "Read-only file system"]

        def read_only(self, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(self))

        monkeypatch.setattr(Path, "mkdir", read_only)
    result = CliRunner().invoke(app, pack_args(inputs, out))
    error_line(result, *parts, "Choose an --out you can write to")
    assert "--resume" not in result.output  # nothing was started, so nothing to resume
    monkeypatch.undo()
    assert CliRunner().invoke(app, pack_args(inputs, tmp_path / "fine")).exit_code == 0  # negative control


@pytest.mark.slow
def test_worker_killed_like_the_oom_killer_resumes_byte_identical(inputs, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    killed = run_cli(pack_args(inputs, out, "--workers", "2"), kill_at="worker:4")
    assert killed.returncode == 1, killed.stderr
    message = " ".join(killed.stderr.split())
    assert "error: a tokenizing worker process died" in message, message
    assert "out-of-memory killer" in message and "lower `--workers` (this run used 2)" in message
    assert "--resume" in message and "Traceback" not in killed.stderr
    assert (out / ".pack-work" / "journal.json").is_file() and not (out / "manifest.json").exists()
    resume_in_process(pack_args(inputs, out, "--resume", "--workers", "2"), monkeypatch)
    assert folder_bytes(out) == reference  # the reference: the same run, not killed (negative control)


@pytest.mark.slow
@pytest.mark.parametrize("string_type", ["string", "large_string"])
def test_parquet_text_that_is_not_utf8(string_type, sample, tmp_path):
    """Parquet does not enforce UTF-8 in string columns; such a value is a bad record like any other."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tokenizer = sample
    values = [b"A board met on Tuesday.", b"caf\xe9 au lait", None, b"Prices rose."]
    binary = pa.large_binary() if string_type == "large_string" else pa.binary()
    column = pa.array(values, binary).view(getattr(pa, string_type)())
    path = tmp_path / "latin1.parquet"
    pq.write_table(pa.table({"text": column}), path)
    args = ["pack", str(path), "--tokenizer", str(tokenizer), "--seq-len", "64", "--out"]
    stopped = CliRunner().invoke(app, [*args, str(tmp_path / "a")])
    error_line(stopped, f"{path}:row 1: invalid UTF-8 at byte 3 of `text`", "--skip-invalid")
    assert not (tmp_path / "a").exists()
    skipped = CliRunner().invoke(app, [*args, str(tmp_path / "b"), "--skip-invalid"])
    assert skipped.exit_code == 0, skipped.output
    docs = Manifest.load(tmp_path / "b").documents
    assert (docs.docs_in, docs.packed, docs.skipped_invalid, docs.skipped_missing_field) == (4, 2, 1, 1)
    assert not docs.problems()
    verified = CliRunner().invoke(app, ["verify", str(tmp_path / "b"), "--source", str(path)])
    assert verified.exit_code == 0, verified.output
