"""Kill `prep pack` with SIGKILL at several points, resume it, and compare bytes with an uninterrupted run.

The kill comes from the documented test hook PREP_TEST_KILL_AT=<phase>:<n> (prep/journal.py), inside a real
subprocess, so nothing gets a chance to flush or clean up. The bundled sample is split into four input files
and tokenized in small batches so that pass 1 has many commit points.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep import encoder
from prep.cli import app
from prep.journal import KILL_ENV, STOP_ENV
from prep.outdir import LOCK_NAME
from shared.errors import IncompleteDatasetError
from shared.fileio import sha256_file
from shared.manifest import Manifest
from shared.reader import PackedDataset
from tests.prep.fingerprints import provenance_apart

SMALL_BATCH = 20_000
"""Characters per tokenized batch in these tests: about 24 batches over the sample instead of one."""
LAUNCH = f"import prep.encoder as e; e.BATCH_CHARS = {SMALL_BATCH}; from prep.cli import main; main()"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(sample, tmp_path_factory) -> tuple[list[str], Path]:
    corpus, tokenizer = sample
    folder = tmp_path_factory.mktemp("resume-inputs")
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    paths = []
    for k in range(4):
        path = folder / f"part{k}.jsonl"
        path.write_text("".join(lines[k::4]), encoding="utf-8")
        paths.append(str(path))
    return paths, tokenizer


def pack_args(inputs: tuple[list[str], Path], out: Path, *extra: str) -> list[str]:
    paths, tokenizer = inputs
    return [
        "pack",
        *paths,
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--seq-len",
        "256",
        "--val-fraction",
        "0.05",
        "--rows-per-shard",
        "50",
        *extra,
    ]


def cli_env(**hooks: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, STOP_ENV)}
    env.update(hooks)
    env["PYTHONPATH"] = str(REPO)
    return env


def run_cli(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = cli_env(**({KILL_ENV: kill_at} if kill_at else {}))
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], env=env, capture_output=True, text=True, timeout=120
    )


def resume_in_process(args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(encoder, "BATCH_CHARS", SMALL_BATCH)
    monkeypatch.delenv(KILL_ENV, raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the card's mentions of the folder's own path are neutralised (it names it)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    if "README.md" in files:
        files["README.md"] = files["README.md"].replace(str(folder).encode(), b"OUT")
    return files


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted run (in an `out` folder, so the card names the same folder)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = CliRunner().invoke(app, pack_args(inputs, out))
    assert result.exit_code == 0, result.output
    files = folder_bytes(out)
    assert len([n for n in files if n.endswith(".arrow")]) > 3, "want several shards to kill between"
    return files


@pytest.mark.parametrize(
    "kill_at",
    ["tokenize:1", "tokenize:14", "shard:1", "shard:4", "manifest:1"],
)
@pytest.mark.slow
def test_killed_pack_resumes_byte_identical(kill_at, inputs, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    killed = run_cli(pack_args(inputs, out), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "manifest.json").exists()
    with pytest.raises(IncompleteDatasetError, match="--resume"):
        PackedDataset(out)
    assert (out / LOCK_NAME).exists(), "the killed run's lock file stays; the resume below takes it over"

    resume_in_process(pack_args(inputs, out, "--resume"), monkeypatch)
    assert folder_bytes(out) == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(reference), "work, lock or temp files left"


@pytest.mark.slow
def test_killed_between_manifest_and_card_leaves_a_dataset_that_resume_completes(
    inputs, reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    killed = run_cli(pack_args(inputs, out), kill_at="card:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "README.md").exists()
    PackedDataset(out, verify="checksum")  # complete: the trainer can use it as it is
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0
    plain = CliRunner().invoke(app, pack_args(inputs, out))
    assert plain.exit_code == 1 and "holds an interrupted pack" in plain.output, plain.output
    resume_in_process(pack_args(inputs, out, "--resume"), monkeypatch)
    assert folder_bytes(out) == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(reference), "work, lock or temp files left"


@pytest.mark.slow
def test_overwrite_of_an_interrupted_pack_removes_its_files_and_keeps_the_users(
    inputs, reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    assert run_cli(pack_args(inputs, out), kill_at="shard:2").returncode == -signal.SIGKILL
    (out / "notes.txt").write_text("mine")
    (out / ".notes.txt.tmp-12").write_text("also mine: not a name prep pack writes")
    resume_in_process(pack_args(inputs, out, "--overwrite"), monkeypatch)
    files = folder_bytes(out)
    assert files.pop("notes.txt") == b"mine" and files.pop(".notes.txt.tmp-12")
    assert files == reference


@pytest.mark.slow
def test_a_second_pack_on_the_same_out_is_refused_while_the_first_runs(inputs, reference, tmp_path):
    """The first run is held (SIGSTOP) after its second shard; every kind of second run is refused, naming
    it, and leaves the folder alone; the first then finishes, and its dataset verifies."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *pack_args(inputs, out)],
        env=cli_env(**{STOP_ENV: "shard:2"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), first.communicate()[0]
        held = folder_bytes(out)
        assert "train-00001-of-00007.arrow" in held and "manifest.json" not in held
        for extra in ((), ("--resume",), ("--overwrite",)):
            second = run_cli(pack_args(inputs, out, *extra))
            assert second.returncode == 1, second.stdout + second.stderr
            message = " ".join((second.stdout + second.stderr).split())
            assert f"is in use by another `prep pack` run (pid {first.pid} on host" in message, message
            assert "Traceback" not in message
            assert folder_bytes(out) == held, f"the refused run {extra} touched the folder"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output
    assert folder_bytes(out) == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(reference), "work, lock or temp files left"
    paths, tokenizer = inputs
    sources = [a for p in paths for a in ("--source", p)]
    verified = CliRunner().invoke(app, ["verify", str(out), "--tokenizer", str(tokenizer), *sources])
    assert verified.exit_code == 0, verified.output


@pytest.mark.slow
def test_killed_twice_then_resumed(inputs, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(pack_args(inputs, out), kill_at="tokenize:9").returncode == -signal.SIGKILL
    again = run_cli(pack_args(inputs, out, "--resume"), kill_at="shard:3")
    assert again.returncode == -signal.SIGKILL, again.stderr
    resume_in_process(pack_args(inputs, out, "--resume"), monkeypatch)
    assert folder_bytes(out) == reference


@pytest.mark.slow
def test_damaged_shard_from_killed_run_is_rewritten(inputs, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(pack_args(inputs, out), kill_at="shard:3").returncode == -signal.SIGKILL
    # Shards recorded in the journal are reused only if they still match; damage one of them.
    first = out / "train-00000-of-00007.arrow"
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    resume_in_process(pack_args(inputs, out, "--resume"), monkeypatch)
    assert folder_bytes(out) == reference


def test_resume_refuses_changed_options(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(pack_args(inputs, out), kill_at="tokenize:3").returncode == -signal.SIGKILL
    args = pack_args(inputs, out, "--resume")
    args[args.index("--seq-len") + 1] = "128"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "--seq-len was 256 in the interrupted run, now 128" in result.output
    assert "--overwrite" in result.output


def test_resume_refuses_changed_input(inputs, tmp_path, monkeypatch):
    paths, tokenizer = inputs
    local = [tmp_path / Path(p).name for p in paths]
    for src, dst in zip(paths, local, strict=True):
        dst.write_bytes(Path(src).read_bytes())
    mine = ([str(p) for p in local], tokenizer)
    out = tmp_path / "out"
    assert run_cli(pack_args(mine, out), kill_at="tokenize:3").returncode == -signal.SIGKILL
    with open(local[2], "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    result = CliRunner().invoke(app, pack_args(mine, out, "--resume"))
    assert result.exit_code == 1
    assert f"input `{local[2]}` changed since the interrupted run" in result.output


@pytest.mark.slow
def test_interrupted_folder_needs_resume_or_overwrite(inputs, tmp_path):
    out = tmp_path / "out"
    assert run_cli(pack_args(inputs, out), kill_at="shard:2").returncode == -signal.SIGKILL
    result = CliRunner().invoke(app, pack_args(inputs, out))
    assert result.exit_code == 1
    assert "holds an interrupted pack" in result.output and "--resume" in result.output
    # Neither verify nor the trainer takes the half-written folder for a dataset.
    from train.cli import app as train_app

    for cli, args in ((app, ["verify", str(out)]), (train_app, ["plan", "--data", str(out)])):
        refused = CliRunner().invoke(cli, args)
        assert refused.exit_code != 0
        assert "packing was interrupted" in refused.output and "--resume" in refused.output
    both = CliRunner().invoke(app, pack_args(inputs, out, "--resume", "--overwrite"))
    assert both.exit_code == 1 and "not both" in both.output


def test_damaged_journal_and_finished_dataset(inputs, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference.items():
        (out / name).write_bytes(data)
    done = CliRunner().invoke(app, pack_args(inputs, out, "--resume"))
    assert done.exit_code == 1 and "it is complete: there is nothing to resume" in done.output
    (out / "manifest.json").unlink()
    (out / ".pack-work").mkdir()
    (out / ".pack-work" / "journal.json").write_text('{"version": 1, "pass1": {')
    damaged = CliRunner().invoke(app, pack_args(inputs, out, "--resume"))
    assert damaged.exit_code == 1
    assert "journal.json` cannot be read" in damaged.output and "--overwrite" in damaged.output


def test_manifest_marked_incomplete_is_refused(inputs, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference.items():
        (out / name).write_bytes(data)
    assert Manifest.load(out).complete
    raw = json.loads(reference["manifest.json"])
    raw["complete"] = False
    (out / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(IncompleteDatasetError, match="incomplete"):
        Manifest.load(out)
    (out / "manifest.json").unlink()
    with pytest.raises(IncompleteDatasetError, match="packing was interrupted"):
        PackedDataset(out)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["tokenize:6", "shard:2"])
def test_killed_pack_of_gzipped_inputs_resumes_to_the_plain_inputs_bytes(
    kill_at, inputs, reference, tmp_path, monkeypatch
):
    """The same parts gzipped: killed mid-file (the resume skips records inside a compressed stream) or
    while writing, then resumed; every byte is the plain run's but the inputs' names."""
    paths, tokenizer = inputs
    gzipped = []
    for path in paths:
        packed = tmp_path / "in" / (Path(path).name + ".gz")
        packed.parent.mkdir(exist_ok=True)
        packed.write_bytes(gzip.compress(Path(path).read_bytes()))
        gzipped.append(str(packed))
    out = tmp_path / "out"
    killed = run_cli(pack_args((gzipped, tokenizer), out), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if kill_at.startswith("tokenize"):  # the case that matters: the resume starts inside a gzip stream
        pass1 = json.loads((out / ".pack-work" / "journal.json").read_text())["pass1"]
        assert pass1["records_done"] > 0 and not pass1["done"], pass1
    resume_in_process(pack_args((gzipped, tokenizer), out, "--resume"), monkeypatch)
    files = folder_bytes(out)
    for name in ("manifest.json", "README.md"):
        for path, packed in zip(paths, gzipped, strict=True):
            files[name] = files[name].replace(packed.encode(), path.encode())
    for path, packed in zip(paths, gzipped, strict=True):  # the card names each input's sha256
        files["README.md"] = files["README.md"].replace(
            sha256_file(packed).encode(), sha256_file(path).encode()
        )
    # The fingerprints are those of the whole gzipped files, though the resumed run started inside them.
    got = provenance_apart(files.pop("manifest.json"), [Path(p) for p in gzipped])
    expected = dict(reference)
    assert got == provenance_apart(expected.pop("manifest.json"), [Path(p) for p in paths])
    assert files == expected
