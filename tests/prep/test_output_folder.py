"""What `prep pack` may do to `--out`: never overlap an input, and remove (or write over) only its own files.

Each case runs through the CLI as a user runs it. The lock (one run per folder) is tested with real
processes in tests/prep/test_crash_resume.py; the lock's own rules are tested here in-process.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.outdir import LOCK_NAME, OutputBusyError, output_lock
from shared.errors import UserError
from shared.manifest import Manifest
from tests.prep import clirun

DOCS = [f"Document {i}: the board met and prices of cocoa rose by {i} percent this week." for i in range(40)]

# Messages wrap at the console's width: parts are matched with whitespace runs as one space.
failed_with = partial(clirun.failed_with, flat=True)


def jsonl(path: Path, texts: list[str] = DOCS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def pack(tokenizer: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()):
    args = ["pack", *map(str, inputs), "--tokenizer", str(tokenizer), "--out", str(out), "--seq-len", "64"]
    return CliRunner().invoke(app, [*args, "--rows-per-shard", "8", *extra])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def packed_once(sample, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tokenizer, input, a packed `ds` folder with several shards), packed once for the module."""
    _, tok = sample
    folder = tmp_path_factory.mktemp("output-folder")
    src = jsonl(folder / "in.jsonl")
    out = folder / "ds"
    assert pack(tok, out, src).exit_code == 0
    assert len(list(out.glob("train-*.arrow"))) >= 3
    return tok, src, out


@pytest.fixture
def dataset(packed_once, tmp_path) -> tuple[Path, Path, Path]:
    """The module's pack copied into this test's folder, where the test may damage it. The card names the
    folder it was packed into, so the copy's card names the copy, as a pack there writes it; the input stays
    where it was packed from (the card names it too) and no test writes to it."""
    tok, src, out = packed_once
    copy = tmp_path / out.name
    shutil.copytree(out, copy)
    card = copy / "README.md"
    card.write_text(card.read_text(encoding="utf-8").replace(str(out), str(copy)), encoding="utf-8")
    return tok, src, copy


@pytest.mark.slow
def test_overwrite_keeps_every_file_the_manifest_does_not_name(dataset, tmp_path):
    tok, src, out = dataset
    (out / "features.arrow").write_bytes(b"the user's own arrow file")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "train-00000-of-00001.arrow").write_bytes(b"not at the top: never ours")
    old_shards = {p.name for p in out.glob("train-*.arrow")}
    again = jsonl(tmp_path / "again.jsonl")  # twice the documents: other shard names
    result = pack(tok, out, src, again, extra=("--overwrite",))
    assert result.exit_code == 0, result.output
    assert (out / "features.arrow").read_bytes() == b"the user's own arrow file"
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "sub" / "train-00000-of-00001.arrow").exists()
    manifest = Manifest.load(out)
    new_shards = {s.file for s in manifest.splits["train"].shards}
    assert old_shards != new_shards and {p.name for p in out.glob("train-*.arrow")} == new_shards
    assert not (out / LOCK_NAME).exists() and not (out / ".pack-work").exists()


@pytest.mark.slow
def test_overwrite_refuses_a_readme_that_is_not_our_card(dataset):
    tok, src, out = dataset
    card = (out / "README.md").read_text(encoding="utf-8")
    (out / "README.md").write_text("# My dataset\n\nNotes I wrote by hand.\n", encoding="utf-8")
    before = tree(out)
    failed_with(
        pack(tok, out, src, extra=("--overwrite",)),
        f"--out `{out}` holds `README.md`, `card_lengths.png`, which the new pack would write over",
        "Move them out of the folder, or choose another --out.",
    )
    assert tree(out) == before, "a refused --overwrite removed something"
    # The control: a card edited below its front matter is still the card, and is replaced.
    (out / "README.md").write_text(card + "\nA line the user added.\n", encoding="utf-8")
    assert pack(tok, out, src, extra=("--overwrite",)).exit_code == 0
    assert (out / "README.md").read_text(encoding="utf-8") == card


@pytest.mark.slow
def test_overwrite_refuses_a_stray_file_under_a_shard_name(dataset):
    tok, src, out = dataset
    stray = out / "val-00000-of-00001.arrow"
    stray.write_bytes(b"not named by the manifest")
    failed_with(pack(tok, out, src, extra=("--overwrite",)), "holds `val-00000-of-00001.arrow`")
    assert stray.read_bytes() == b"not named by the manifest"
    assert Manifest.load(out).documents.packed == len(DOCS), "the refused run left the dataset as it was"


@pytest.mark.slow
def test_overwrite_refuses_when_the_manifest_cannot_be_read(dataset):
    tok, src, out = dataset
    (out / "manifest.json").write_text("{", encoding="utf-8")
    before = tree(out)
    failed_with(
        pack(tok, out, src, extra=("--overwrite",)),
        f"`--overwrite` removes only the files the manifest in `{out}` names, and it cannot be read",
        f"Empty `{out}` yourself (or choose another --out)",
    )
    assert tree(out) == before


@pytest.mark.slow
def test_arrow_files_alone_do_not_make_a_dataset(sample, tmp_path):
    """A folder of someone's .arrow files (no manifest) is not ours to replace, even with --overwrite."""
    _, tok = sample
    out = tmp_path / "arrows"
    out.mkdir()
    (out / "features.arrow").write_bytes(b"x")
    (out / "train-00000-of-00001.arrow").write_bytes(b"y")
    src = jsonl(tmp_path / "in.jsonl")
    failed_with(pack(tok, out, src, extra=("--overwrite",)), "is a non-empty folder that is not a dataset")
    assert tree(out) == {"features.arrow": b"x", "train-00000-of-00001.arrow": b"y"}


@pytest.mark.slow
def test_a_saved_dataset_as_input_and_out_is_refused(sample, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, tok = sample
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    before = tree(saved)
    for extra in ((), ("--overwrite",)):
        failed_with(pack(tok, saved, saved, extra=extra), f"--out `{saved}` is the input `{saved}`")
    assert tree(saved) == before
    # The control: the same folder packs into an --out of its own.
    assert pack(tok, tmp_path / "packed", saved).exit_code == 0


@pytest.mark.slow
def test_out_inside_an_input_folder_or_holding_an_input_is_refused(sample, tmp_path):
    _, tok = sample
    data = tmp_path / "data"
    jsonl(data / "a.jsonl")
    failed_with(pack(tok, data / "packed", data), "lies inside the input folder", "outside every input")
    link = tmp_path / "link"
    link.symlink_to(data)
    failed_with(pack(tok, link / "packed", data), "lies inside the input folder")  # through a symlink
    assert not (data / "packed").exists(), "a refused run created --out"
    holder = tmp_path / "holder"
    inner = jsonl(holder / "more" / "b.jsonl")
    failed_with(pack(tok, holder, inner), f"--out `{holder}` holds the input `{inner}`")
    failed_with(pack(tok, holder, str(holder / "*" / "*.jsonl")), "holds the input")  # found by a glob
    assert tree(holder) == {"more/b.jsonl": inner.read_bytes()}
    assert pack(tok, tmp_path / "elsewhere", data).exit_code == 0  # the control


def test_the_lock_refuses_a_second_holder_names_it_and_goes_with_its_holder(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        busy = rf"in use by another `prep pack` run \(pid {os.getpid()} on"
        with pytest.raises(OutputBusyError, match=busy), output_lock(out):
            pass
        (out / "kept").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["kept"], "the lock file is removed as the run ends"
    with output_lock(out):  # free again
        pass
    with output_lock(tmp_path / "new" / "folder"):
        pass
    assert not (tmp_path / "new" / "folder").exists(), "a folder the run created and left empty is removed"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; pass a folder"), output_lock(tmp_path / "file"):
        pass
    cannot = "cannot write to --out `/proc/x`: .*Choose an --out you can write to"
    with pytest.raises(UserError, match=cannot), output_lock(Path("/proc/x")):
        pass
