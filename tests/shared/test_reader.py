"""Damaged datasets are caught before any of their data is used, with a message naming the file and the fix.

Each test damages one copy of a small packed dataset: a truncated shard, a flipped byte, corrupted offsets,
a shard from another tokenizer, a schema or format-version change, a damaged manifest. Each is also a
negative control for the check that catches it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from shared.contract import SCHEMA_METADATA_KEY, read_schema_metadata
from shared.errors import IncompleteDatasetError, ManifestError, ShardIntegrityError
from shared.fileio import sha256_file
from shared.manifest import Manifest
from shared.reader import PackedDataset, Shard


@pytest.fixture
def dataset(packed, tmp_path) -> Path:
    copy = tmp_path / "packed"
    shutil.copytree(packed, copy)
    return copy


def first_shard(root: Path) -> Path:
    return root / Manifest.load(root).splits["train"].shards[0].file


def open_all(root: Path, verify: str) -> None:
    ds = PackedDataset(root, verify=verify)
    for name in ds.split_names:
        ds.split(name)


def rewrite_shard(path: Path, schema: pa.Schema, transform=lambda batch: batch) -> None:
    """Write the shard again with another schema (and metadata), batch by batch."""
    # Read into memory first: truncating a file that is still memory-mapped would crash with SIGBUS.
    batches = list(pa.ipc.open_stream(pa.BufferReader(path.read_bytes())))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(transform(batch))


def sync_manifest(root: Path, shard: Path) -> None:
    """Make the manifest agree with a changed shard's size and checksum, so only deeper checks can object."""
    raw = json.loads((root / "manifest.json").read_text())
    for split in raw["splits"].values():
        for info in split["shards"]:
            if info["file"] == shard.name:
                info["num_bytes"], info["sha256"] = shard.stat().st_size, sha256_file(shard)
    (root / "manifest.json").write_text(json.dumps(raw))


def with_metadata(path: Path, **changes) -> pa.Schema:
    schema = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).schema
    meta = {**read_schema_metadata(schema), **changes}
    return schema.with_metadata({SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def test_intact_dataset_opens_with_every_level(dataset):
    for verify in ("none", "size", "checksum"):
        open_all(dataset, verify)


def test_truncated_shard(dataset):
    shard = first_shard(dataset)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardIntegrityError, match=rf"`{shard.name}`: size mismatch.*re-run `prep pack`"):
        open_all(dataset, "size")
    with pytest.raises(ShardIntegrityError, match="truncated or damaged"):
        open_all(dataset, "none")


def test_truncated_at_a_batch_boundary_is_caught_by_row_count(dataset):
    shard = first_shard(dataset)
    reader = pa.ipc.open_stream(pa.BufferReader(shard.read_bytes()))
    batches = list(reader)
    schema = reader.schema
    assert (
        len(batches) == 1 or batches[0].num_rows < Manifest.load(dataset).splits["train"].shards[0].num_rows
    )
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batches[0].slice(0, batches[0].num_rows // 2))
    with pytest.raises(ShardIntegrityError, match=r"rows but the manifest says"):
        open_all(dataset, "none")


def test_flipped_byte_needs_the_checksum(dataset):
    shard = first_shard(dataset)
    data = bytearray(shard.read_bytes())
    data[-len(data) // 3] ^= 0x01  # inside the token values: still a well-formed Arrow file
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=rf"`{shard.name}`: checksum mismatch.*re-run `prep pack`"):
        open_all(dataset, "checksum")
    open_all(dataset, "size")  # the documented limit of the cheap check: same size, so it passes


def test_corrupted_offsets_are_caught_before_use(dataset):
    shard = first_shard(dataset)
    schema = pa.ipc.open_stream(pa.BufferReader(shard.read_bytes())).schema

    def break_offsets(batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = batch.column("input_ids")
        offsets = ids.offsets.to_numpy().copy()
        offsets[1] = offsets[-1] + 10_000  # row 0 would read far past the token buffer
        bad = pa.Array.from_buffers(
            ids.type,
            len(ids),
            [None, pa.py_buffer(offsets.astype(np.int32).tobytes())],
            children=[ids.values],
        )
        return pa.RecordBatch.from_arrays([bad, *batch.columns[1:]], schema=batch.schema)

    rewrite_shard(shard, schema, break_offsets)
    sync_manifest(dataset, shard)
    with pytest.raises(ShardIntegrityError, match=rf"`.*{shard.name}` has an invalid record batch.*damaged"):
        open_all(dataset, "checksum")


def test_shard_from_another_tokenizer(dataset):
    shard = first_shard(dataset)
    rewrite_shard(shard, with_metadata(shard, tokenizer_sha256="f" * 64))
    sync_manifest(dataset, shard)
    with pytest.raises(
        ShardIntegrityError, match=rf"`{shard.name}`: metadata `tokenizer_sha256`.*another tokenizer"
    ):
        open_all(dataset, "checksum")


def test_shard_from_another_dataset(dataset):
    shard = first_shard(dataset)
    rewrite_shard(shard, with_metadata(shard, seq_len=4096))
    sync_manifest(dataset, shard)
    with pytest.raises(ShardIntegrityError, match=r"metadata `seq_len` is 4096, the manifest says 128"):
        open_all(dataset, "size")


def test_format_version_mismatch(dataset):
    shard = first_shard(dataset)
    rewrite_shard(shard, with_metadata(shard, format_version=99))
    with pytest.raises(ShardIntegrityError, match="format_version 99; this tool reads version 1. Re-pack"):
        Shard(shard)
    raw = json.loads((dataset / "manifest.json").read_text())
    raw["format_version"] = 99
    (dataset / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="format_version 99.*Re-pack"):
        PackedDataset(dataset)


def test_schema_mismatch(dataset):
    shard = first_shard(dataset)
    schema = pa.ipc.open_stream(pa.BufferReader(shard.read_bytes())).schema
    wide = schema.set(0, pa.field("input_ids", pa.list_(pa.int64()), nullable=False))

    def widen(batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = batch.column("input_ids").cast(pa.list_(pa.int64()))
        return pa.RecordBatch.from_arrays([ids, *batch.columns[1:]], schema=wide)

    rewrite_shard(shard, wide, widen)
    with pytest.raises(
        ShardIntegrityError,
        match=rf"`.*{shard.name}` has the wrong schema \(column `input_ids` is list<item: int64>, expected list<item: int32>\).*re-pack the data",
    ):
        Shard(shard)


def test_missing_shard(dataset):
    shard = first_shard(dataset)
    shard.unlink()
    with pytest.raises(ShardIntegrityError, match=rf"`{shard.name}` listed in the manifest is missing"):
        open_all(dataset, "size")


def test_damaged_manifest(dataset):
    path = dataset / "manifest.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match="is not valid JSON.*re-run `prep pack`"):
        PackedDataset(dataset)
    raw = json.loads(text)
    del raw["splits"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="field `splits` is missing"):
        PackedDataset(dataset)
    path.unlink()
    with pytest.raises(IncompleteDatasetError, match=r"no manifest.json.*--out .*packed --resume"):
        PackedDataset(dataset)


def _replace_list(batch: pa.RecordBatch, name: str, array: pa.ListArray) -> pa.RecordBatch:
    columns = [array if n == name else batch.column(n) for n in batch.schema.names]
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def test_token_columns_of_unequal_length_are_refused(dataset):
    """Rows are sliced with input_ids' offsets for all three token columns: a shard where labels are
    shorter in one row (still valid Arrow) must be refused, not read misaligned."""
    shard = first_shard(dataset)

    def shorten_first_label_row(batch):
        labels = batch.column("labels")
        offsets = labels.offsets.to_numpy().copy()
        values = labels.values.to_numpy()
        offsets[1:] -= 1  # row 0 loses its last label
        values = np.delete(values, offsets[1])
        return _replace_list(batch, "labels", pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))

    rewrite_shard(shard, with_metadata(shard), shorten_first_label_row)
    sync_manifest(dataset, shard)
    with pytest.raises(ShardIntegrityError, match="`labels` and `input_ids` differ in length"):
        open_all(dataset, "checksum")


def test_cu_seqlens_without_one_entry_per_segment_plus_one_is_refused(dataset):
    shard = first_shard(dataset)

    def drop_last_boundary_of_row_0(batch):
        cu = batch.column("cu_seqlens")
        offsets = cu.offsets.to_numpy().copy()
        values = np.delete(cu.values.to_numpy(), offsets[1] - 1)
        offsets[1:] -= 1
        return _replace_list(
            batch, "cu_seqlens", pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        )

    rewrite_shard(shard, with_metadata(shard), drop_last_boundary_of_row_0)
    sync_manifest(dataset, shard)
    with pytest.raises(ShardIntegrityError, match="one entry per segment plus one"):
        open_all(dataset, "checksum")
