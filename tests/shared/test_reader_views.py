"""``Split.views``, the loader's row access: the same zero-copy slices as ``Split.row``, a damaged
cu_seqlens refused, and a dataset opened without importing pandas (which cost 0.4 s per process)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from shared.errors import ShardIntegrityError
from shared.manifest import Manifest
from shared.reader import PackedDataset


def test_views_are_the_rows_slices(packed):
    split = PackedDataset(packed).split("train")
    assert len(split.shards) > 1  # rows are located across shards and record batches
    indices = [split.num_rows - 1, 0, 151, 7, 151]
    views = split.views(indices)
    for k, index in enumerate(indices):
        row = split.row(index)
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            got, want = getattr(views, name)[k], getattr(row, name)
            assert np.array_equal(got, want) and np.shares_memory(got, want), name
        assert (views.num_tokens[k], views.num_segments[k]) == (row.num_tokens, row.num_segments)
    with pytest.raises(IndexError, match="out of range"):
        split.views([split.num_rows])


def test_views_refuse_a_row_whose_cu_seqlens_does_not_end_at_its_length(packed, tmp_path):
    copy = tmp_path / "packed"
    shutil.copytree(packed, copy)
    path = copy / Manifest.load(copy).splits["train"].shards[0].file
    # Same offsets, same file size: only the values are wrong, which no offset check on open sees.
    reader = pa.ipc.open_stream(pa.BufferReader(path.read_bytes()))
    batches = list(reader)
    cu = batches[0].column("cu_seqlens")
    values = np.frombuffer(cu.values.buffers()[1], dtype=np.int32, count=len(cu.values)).copy()
    values[cu.offsets[1].as_py() - 1] -= 1  # row 0's last entry
    damaged = pa.ListArray.from_arrays(cu.offsets, pa.array(values, pa.int32()))
    columns = [damaged if n == "cu_seqlens" else batches[0].column(n) for n in batches[0].schema.names]
    batches[0] = pa.RecordBatch.from_arrays(columns, schema=reader.schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    split = PackedDataset(copy).split("train")
    split.views([1, 2])  # the other rows are intact
    with pytest.raises(ShardIntegrityError, match="cu_seqlens from 0 to"):
        split.views([1, 0])
    # negative control: the intact dataset's row 0 passes
    PackedDataset(packed).split("train").views([0])


@pytest.mark.slow
def test_opening_a_dataset_does_not_import_pandas(packed):
    code = (
        "import sys; from shared.reader import PackedDataset;"
        f" s = PackedDataset({str(packed)!r}).split('train'); s.views([0]); s.row(0);"
        " print('pandas' in sys.modules)"
    )
    assert subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout == ("False\n")
    # negative control: the call the reader avoids does import it
    control = "import sys, pyarrow as pa; pa.array([1]).to_numpy(); print('pandas' in sys.modules)"
    assert subprocess.run(
        [sys.executable, "-c", control], capture_output=True, text=True, check=True
    ).stdout == ("True\n")
