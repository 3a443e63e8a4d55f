"""Input discovery (prep/discovery.py): every file is read or reported, never added or dropped silently.

One test per class of the rule, each through the `prep pack` CLI where the user meets it, with the negative
control beside it (the same data given the way the rule does read it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from prep.discovery import SHOWN, discover_inputs
from shared.manifest import Manifest
from tests.prep.clirun import failed_with, ok, run


def pack(tok: Path, out: Path, *inputs: str | Path, extra: tuple[str, ...] = ()):
    return run("pack", *inputs, "--tokenizer", tok, "--out", out, "--seq-len", "64", *extra)


def docs(path: Path, *texts: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def read(*inputs: str | Path, dataset_split: str | None = None) -> list[str]:
    return [str(f.path) for f in discover_inputs([str(i) for i in inputs], dataset_split).files]


def ignored(*inputs: str | Path) -> dict[str, str]:
    return {i.path: i.reason for i in discover_inputs([str(i) for i in inputs]).ignored}


def save_dict(folder: Path, **splits: list[str]) -> Path:
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": texts}) for name, texts in splits.items()}
    ).save_to_disk(str(folder))
    return folder


@pytest.mark.slow
def test_a_dataset_dict_with_several_splits_needs_one_chosen(sample, tmp_path):
    _, tok = sample
    dd = save_dict(tmp_path / "dd", train=["first train doc", "second train doc"], test=["held-out doc"])
    failed_with(
        pack(tok, tmp_path / "out", dd),
        f"dataset `{dd}` is a DatasetDict with splits train, test; choose the one to pack with"
        " `--dataset-split NAME`, or pass split folders as inputs",
    )
    assert not (tmp_path / "out").exists()
    failed_with(
        pack(tok, tmp_path / "out", dd, extra=("--dataset-split", "validation")),
        "has no split `validation` (its splits: train, test)",
    )

    output = ok(pack(tok, tmp_path / "out", dd, extra=("--dataset-split", "train")))
    assert f"reading 1 input file: {dd} (split train)" in output
    m = Manifest.load(tmp_path / "out")
    assert m.documents.docs_in == 2 and m.options.dataset_split == "train"
    assert [(i.path, i.dataset_split) for i in m.inputs] == [(str(dd), "train")]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| `{dd}` (split train) |" in card and "--dataset-split train" in card
    # verify --source reads the recorded split again: the test split's document would not match.
    ok(run("verify", tmp_path / "out", "--source", dd))

    # Negative control: the test split alone is one document, as its own folder or chosen by name.
    ok(pack(tok, tmp_path / "out-test", dd / "test"))
    assert Manifest.load(tmp_path / "out-test").documents.docs_in == 1
    ok(pack(tok, tmp_path / "out-test2", dd, extra=("--dataset-split", "test")))
    assert Manifest.load(tmp_path / "out-test2").documents.docs_in == 1


@pytest.mark.slow
def test_a_single_split_dataset_dict_is_read_as_that_split(sample, tmp_path):
    _, tok = sample
    dd = save_dict(tmp_path / "dd", validation=["only doc one", "only doc two", "only doc three"])
    ok(pack(tok, tmp_path / "out", dd))
    m = Manifest.load(tmp_path / "out")
    assert m.documents.docs_in == 3 and m.inputs[0].dataset_split == "validation"
    assert m.options.dataset_split is None
    ok(run("verify", tmp_path / "out", "--source", dd))


def test_dataset_split_without_a_dataset_dict_is_refused(sample, tmp_path):
    corpus, tok = sample
    failed_with(
        pack(tok, tmp_path / "out", corpus, extra=("--dataset-split", "train")),
        "--dataset-split 'train' chooses the split of a saved DatasetDict, and no input is one; drop the option.",
    )


@pytest.mark.slow
def test_verify_source_refuses_a_dataset_read_with_another_split(sample, tmp_path):
    _, tok = sample
    dd = save_dict(tmp_path / "dd", train=["a train doc", "b train doc"], test=["one", "two"])
    ok(pack(tok, tmp_path / "out", dd, extra=("--dataset-split", "train")))
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    raw["options"]["dataset_split"] = "test"  # same record counts: only the recorded split tells them apart
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(raw))
    result = run("verify", tmp_path / "out", "--source", dd)
    assert result.exit_code == 1 and "is read as split 'test'" in result.output, result.output


@pytest.mark.slow
def test_an_existing_path_is_literal_even_with_glob_characters(sample, tmp_path):
    _, tok = sample
    literal = docs(tmp_path / "data[1].jsonl", "the bracketed file's only document")
    docs(tmp_path / "data1.jsonl", "another file", "that a glob would match")
    assert read(literal) == [str(literal)]
    ok(pack(tok, tmp_path / "out", literal))
    m = Manifest.load(tmp_path / "out")
    assert [i.path for i in m.inputs] == [str(literal)] and m.documents.docs_in == 1
    # Negative control: a path that does not exist is a pattern, and says which file it read.
    output = ok(pack(tok, tmp_path / "out2", tmp_path / "data[1-9].jsonl"))
    assert f"reading 1 input file: {tmp_path / 'data1.jsonl'}" in output
    assert Manifest.load(tmp_path / "out2").documents.docs_in == 2


@pytest.mark.slow
def test_a_saved_dataset_in_a_folder_is_read_as_a_dataset(sample, tmp_path):
    _, tok = sample
    folder = tmp_path / "corpus"
    docs(folder / "a.jsonl", "a document from JSON lines")
    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(folder / "saved"))
    found = discover_inputs([str(folder)])
    assert [(str(f.path), f.format) for f in found.files] == [
        (str(folder / "a.jsonl"), "jsonl"),
        (str(folder / "saved"), "arrow-dataset"),
    ]
    assert found.ignored == ()
    for out, extra in (("out", ()), ("out-skip", ("--skip-invalid",))):
        ok(pack(tok, tmp_path / out, folder, extra=extra))
        d = Manifest.load(tmp_path / out).documents
        assert (d.docs_in, d.packed, d.skipped_invalid) == (3, 3, 0)
    # A DatasetDict met in a folder follows the split rule too: refused until a split is chosen.
    save_dict(folder / "zz", train=["x doc"], test=["y doc"])
    failed_with(pack(tok, tmp_path / "out2", folder), "is a DatasetDict with splits train, test")
    ok(pack(tok, tmp_path / "out2", folder, extra=("--dataset-split", "test")))
    assert Manifest.load(tmp_path / "out2").documents.docs_in == 4


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_symlinked_folders_are_followed_and_loops_read_once(sample, tmp_path):
    _, tok = sample
    folder, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    docs(folder / "a.jsonl", "in the folder itself")
    docs(elsewhere / "b.jsonl", "behind a symbolic link")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    assert read(folder) == [str(folder / "a.jsonl"), str(folder / "linked" / "b.jsonl")]
    assert ignored(folder) == {
        str(folder / "dangling.jsonl"): "a broken symbolic link",
        str(folder / "loop"): f"the same folder as `{folder}`, already read",
    }
    output = ok(pack(tok, tmp_path / "out", folder))
    assert "ignored 2 files (recorded in manifest.json):" in output
    assert f"  {folder / 'loop'}: the same folder as `{folder}`, already read" in output
    m = Manifest.load(tmp_path / "out")
    assert m.documents.docs_in == 2 and len(m.ignored) == 2


@pytest.mark.slow
def test_documentation_and_earlier_packs_in_a_folder_are_not_documents(sample, tmp_path):
    _, tok = sample
    folder = tmp_path / "corpus"
    docs(folder / "a.jsonl", "the only training document")
    (folder / "README.md").write_text("# About this corpus\n")
    (folder / "LICENSE.txt").write_text("All rights reserved.\n")
    ok(pack(tok, folder / "packed", folder / "a.jsonl"))  # an earlier pack, card and manifest inside
    assert (folder / "packed" / "README.md").exists()
    assert ignored(folder) == {
        str(folder / "LICENSE.txt"): "documentation (a README, license or markdown file, or a data card);"
        " name it as an input to pack it",
        str(folder / "README.md"): "documentation (a README, license or markdown file, or a data card);"
        " name it as an input to pack it",
        str(folder / "packed"): "a dataset written by `prep pack` (shards, manifest and card), not documents",
    }
    ok(pack(tok, tmp_path / "out", folder))
    assert Manifest.load(tmp_path / "out").documents.docs_in == 1
    # Named as an input, a markdown file is a document (the negative control); a packed folder is refused.
    ok(pack(tok, tmp_path / "out-md", folder / "README.md"))
    assert Manifest.load(tmp_path / "out-md").documents.docs_in == 1
    failed_with(
        pack(tok, tmp_path / "out-p", folder / "packed"),
        f"input `{folder / 'packed'}` is a dataset written by `prep pack`, not documents",
    )


@pytest.mark.slow
def test_unread_compressions_are_reported_in_folders_and_refused_when_named(sample, tmp_path):
    _, tok = sample
    folder = tmp_path / "corpus"
    docs(folder / "a.jsonl", "read")
    (folder / "b.jsonl.lz4").write_bytes(b"\x04\x22\x4d\x18 not really")
    (folder / "c.xml").write_text("<text>x</text>\n")
    reason = f"compressed (.lz4); unpack it to pack it (`unlz4 {folder / 'b.jsonl.lz4'}`)"
    for spec in (folder, folder / "*"):
        assert read(spec) == [str(folder / "a.jsonl")]
        assert ignored(spec)[str(folder / "b.jsonl.lz4")] == reason
        assert ignored(spec)[str(folder / "c.xml")] == "of a type prep pack does not read (.xml)"
    output = ok(pack(tok, tmp_path / "out", folder / "*"))
    assert f"  {folder / 'b.jsonl.lz4'}: {reason}" in output
    assert [i.path for i in Manifest.load(tmp_path / "out").ignored] == [
        str(folder / "b.jsonl.lz4"),
        str(folder / "c.xml"),
    ]
    failed_with(
        pack(tok, tmp_path / "out2", folder / "b.jsonl.lz4"),
        f"input `{folder / 'b.jsonl.lz4'}` is compressed (.lz4); unpack it to pack it (`unlz4",
        "then pass the unpacked file.",
    )
    failed_with(
        pack(tok, tmp_path / "out3", folder / "*.lz4"), "gives no file to read", "is compressed (.lz4)"
    )


def test_hidden_files_and_repeats_are_reported(sample, tmp_path):
    _, tok = sample
    folder = tmp_path / "corpus"
    a = docs(folder / "a.jsonl", "seen")
    docs(folder / ".cache" / "x.jsonl", "in a hidden folder")
    docs(folder / ".b.jsonl", "hidden file")
    assert read(folder) == [str(a)]
    assert ignored(folder) == {
        str(folder / ".b.jsonl"): "hidden (its name starts with a dot)",
        str(folder / ".cache"): "hidden (its name starts with a dot)",
    }
    # An input that adds nothing is refused rather than dropped; a hidden file named explicitly is read.
    failed_with(
        pack(tok, tmp_path / "out", folder, a), f"input `{a}` gives no file to read: `{a}` is already read"
    )
    failed_with(pack(tok, tmp_path / "out", a, a), "already read (given twice)")
    link = tmp_path / "link.jsonl"
    link.symlink_to(a)
    failed_with(pack(tok, tmp_path / "out", a, link), f"`{link}` is the same file as `{a}`, already read")
    assert read(folder / ".b.jsonl") == [str(folder / ".b.jsonl")]


@pytest.mark.slow
def test_many_ignored_files_are_summarised_and_all_recorded(sample, tmp_path):
    _, tok = sample
    folder = tmp_path / "corpus"
    docs(folder / "a.jsonl", "the one document")
    for i in range(SHOWN + 5):
        (folder / f"z{i:02d}.xml").write_text("x\n")
    output = ok(pack(tok, tmp_path / "out", folder))
    assert f"ignored {SHOWN + 5} files" in output and "  and 5 more" in output
    assert str(folder / "z09.xml") in output and str(folder / "z10.xml") not in output
    assert len(Manifest.load(tmp_path / "out").ignored) == SHOWN + 5
    ok(run("verify", tmp_path / "out", "--source", folder))


def test_folders_are_read_in_sorted_order_depth_first(tmp_path):
    for name in ("b.jsonl", "a/z.jsonl", "a/b/c.jsonl", "a.jsonl", "ab.txt"):
        docs(tmp_path / "in" / name, "x")
    expected = sorted(p for p in (tmp_path / "in").rglob("*") if p.is_file())  # Path order: per component
    assert read(tmp_path / "in") == [str(p) for p in expected]


def test_manifests_without_the_new_fields_load_and_are_written_the_same(sample, tmp_path):
    corpus, tok = sample
    ok(pack(tok, tmp_path / "out", corpus))
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # Nothing ignored, no DatasetDict: the fields are left out, so the bytes are those of before.
    assert "ignored" not in raw and "dataset_split" not in raw["options"]
    assert "dataset_split" not in raw["inputs"][0]
    m = Manifest.load(tmp_path / "out")
    assert m.ignored == () and m.inputs[0].dataset_split is None
    assert m.to_json() == (tmp_path / "out" / "manifest.json").read_text()
