"""An edited manifest is refused by name: field types and ranges, shard paths that leave the folder, vocab_size.

Each test edits one field of a copy of a small packed dataset and checks that `PackedDataset` (what the
trainer opens) and `prep verify` refuse it with the field named; the untouched copy is the negative control.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prep.cli import app
from shared.contract import SCHEMA_METADATA_KEY, read_schema_metadata
from shared.errors import ManifestError, ShardIntegrityError
from shared.fileio import sha256_file
from shared.reader import PackedDataset


@pytest.fixture
def dataset(packed, tmp_path) -> Path:
    copy = tmp_path / "packed"
    shutil.copytree(packed, copy)
    return copy


def first_shard(root: Path) -> str:
    return json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]


def edit(root: Path, change) -> None:
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def open_all(root: Path) -> None:
    ds = PackedDataset(root, verify="checksum")
    for name in ds.split_names:
        ds.split(name)


def verify(root: Path, *extra: str):
    return CliRunner().invoke(app, ["verify", str(root), *extra])


def refused(result, *parts: str) -> None:
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    flat = " ".join(result.output.split())
    for part in parts:
        assert part in flat, f"{part!r} not in {flat!r}"


def test_untouched_copy_passes(dataset):
    open_all(dataset)
    assert verify(dataset).exit_code == 0


@pytest.mark.parametrize(
    "file",
    [
        "../outside.arrow",
        "/tmp/outside.arrow",
        "sub/train.arrow",
        "..",
        "train.txt",
        ".hidden.arrow",
        "a\\b.arrow",
    ],
)
def test_shard_path_outside_the_folder_is_refused(dataset, file):
    outside = dataset.parent / "outside.arrow"
    # a real shard there: only the path rule stands in the way
    shutil.copy(dataset / first_shard(dataset), outside)
    edit(dataset, lambda raw: raw["splits"]["train"]["shards"][0].update(file=file))
    with pytest.raises(ManifestError, match=r"field `splits\.train\.shards\[0\]\.file`"):
        PackedDataset(dataset)
    refused(verify(dataset), "field `splits.train.shards[0].file`", "restore it, or re-run `prep pack`")


def test_shard_link_to_a_file_elsewhere_is_refused(dataset):
    elsewhere = dataset.parent / "elsewhere.arrow"
    shard = first_shard(dataset)
    (dataset / shard).rename(elsewhere)
    (dataset / shard).symlink_to(elsewhere)
    with pytest.raises(ShardIntegrityError, match="outside the dataset folder"):
        open_all(dataset)
    refused(verify(dataset), f"shard `{shard}`", "resolves to", "outside the dataset folder")
    # negative control: the same file, moved back, is read
    (dataset / shard).unlink()
    elsewhere.rename(dataset / shard)
    open_all(dataset)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", 0, "is 0, outside 1..2,147,483,648"),
        ("vocab_size", -5, "is -5, a count or id below zero"),
        ("vocab_size", "abc", 'is "abc", expected an int'),
        ("vocab_size", None, "is null, expected an int"),
        ("vocab_size", True, "is true, expected an int"),
        ("vocab_size", 10**12, "is 1,000,000,000,000, outside 1..2,147,483,648"),
        ("eos_id", 10**6, "is 1,000,000, not below `tokenizer.vocab_size`"),
    ],
)
def test_edited_tokenizer_field_is_named_on_load(dataset, field, value, message):
    edit(dataset, lambda raw: raw["tokenizer"].update({field: value}))
    with pytest.raises(ManifestError, match=f"field `tokenizer.{field}`"):
        PackedDataset(dataset)
    refused(verify(dataset), f"field `tokenizer.{field}` {message}")


@pytest.mark.parametrize("delta", [-600, 7])
def test_vocab_size_edited_within_range_is_caught_by_the_shards(dataset, delta):
    schema = pa.ipc.open_stream(pa.memory_map(str(dataset / first_shard(dataset)))).schema
    real = read_schema_metadata(schema)["vocab_size"]
    edit(dataset, lambda raw: raw["tokenizer"].update(vocab_size=real + delta))
    ds = PackedDataset(dataset)  # the manifest alone is well formed...
    with pytest.raises(ManifestError, match=f"vocab_size` is {real + delta:,}, but the tokenizer"):
        ds.split("train")  # ...but every shard says which vocabulary it was packed with
    refused(verify(dataset), "field `tokenizer.vocab_size`", f"set the field back to {real}")


def test_vocab_size_checked_against_the_tokenizer_when_shards_do_not_say(dataset, sample):
    """Shards written before the metadata key existed: `prep verify` compares with the tokenizer itself."""
    for path in dataset.glob("*.arrow"):
        data = pa.BufferReader(path.read_bytes())
        reader = pa.ipc.open_stream(data)
        meta = read_schema_metadata(reader.schema)
        del meta["vocab_size"]
        schema = reader.schema.with_metadata({SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
        batches = list(reader)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)

    def resync(raw):
        for split in raw["splits"].values():
            for info in split["shards"]:
                path = dataset / info["file"]
                info["num_bytes"], info["sha256"] = path.stat().st_size, sha256_file(path)

    edit(dataset, resync)
    assert verify(dataset, "--tokenizer", str(sample[1])).exit_code == 0  # negative control
    edit(dataset, lambda raw: raw["tokenizer"].update(vocab_size=raw["tokenizer"]["vocab_size"] + 7))
    open_all(dataset)  # nothing in the shards to compare with: the documented limit
    refused(verify(dataset, "--tokenizer", str(sample[1])), "field `tokenizer.vocab_size`", "was edited")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("documents", "packed"), "5", 'is "5", expected an int'),
        (("options", "seq_len"), 1, "is 1, outside 2..2,147,483,647"),
        (("options", "val_fraction"), "x", "expected a float"),
        (("splits", "train", "num_rows"), -1, "below zero"),
        (("documents", "surprise"), 1, "is not a field of this format"),
        (("inputs",), {}, "expected a list"),
    ],
)
def test_any_edited_field_is_named(dataset, path, value, message):
    def change(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    edit(dataset, change)
    with pytest.raises(ManifestError, match="field `" + ".".join(path)):
        PackedDataset(dataset)
    refused(verify(dataset), message)
