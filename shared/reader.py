"""Memory-mapped access to packed shards, for the trainer, `prep verify` and `prep inspect` alike.

Shards are Arrow IPC stream files opened through ``pyarrow.memory_map``: the token arrays are views of the
page cache, so opening a dataset costs neither memory nor time in proportion to its size.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from shared.contract import (
    CU_SEQLENS,
    DOC_IDS,
    FORMAT_VERSION,
    INPUT_IDS,
    LABELS,
    MANIFEST_NAME,
    POSITION_IDS,
    SHARD_SCHEMA,
    read_schema_metadata,
)
from shared.errors import DatasetError, ManifestError, ShardIntegrityError
from shared.fileio import sha256_file
from shared.manifest import Manifest, ShardInfo

_COLUMNS = (INPUT_IDS, LABELS, POSITION_IDS, CU_SEQLENS, DOC_IDS)


@dataclass(frozen=True, slots=True)
class PackedRow:
    """One packed sequence, as zero-copy numpy views into the shard."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    doc_ids: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_segments(self) -> int:
        return len(self.doc_ids)


@dataclass(frozen=True, slots=True)
class RowViews:
    """Zero-copy views of many rows, one list per column (``Split.row`` without doc_ids or a per-row
    object): what the loader concatenates into micro-batches."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    position_ids: list[np.ndarray]
    cu_seqlens: list[np.ndarray]
    num_tokens: list[int]
    num_segments: list[int]


def numpy_view(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a signed-integer Arrow array without nulls.

    Not ``Array.to_numpy``: its first call imports pandas, which would be most of a dataset's opening
    time and of every `prep pack`'s data card.
    """
    assert pa.types.is_signed_integer(array.type) and array.null_count == 0, array.type
    dtype = np.dtype(f"int{array.type.bit_width}")
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


class _BatchRows:
    """Row access into one record batch: numpy views of its value buffers and two offset arrays.

    The three token columns share one offsets array and `doc_ids`/`cu_seqlens` another; both facts are
    checked here, once per batch, so a row is five slices with no per-column bookkeeping.
    """

    __slots__ = (
        "tok",
        "seg",
        "input_ids",
        "labels",
        "position_ids",
        "cu_seqlens",
        "doc_ids",
        "tok_ints",
        "seg_ints",
        "cu_ints",
    )

    def __init__(self, batch: pa.RecordBatch, path: Path) -> None:
        columns = {name: batch.column(name) for name in _COLUMNS}
        tok = numpy_view(columns[INPUT_IDS].offsets)
        seg = numpy_view(columns[DOC_IDS].offsets)
        for name in (LABELS, POSITION_IDS):
            if not np.array_equal(numpy_view(columns[name].offsets), tok):
                raise ShardIntegrityError(
                    f"shard `{path}`: `{name}` and `input_ids` differ in length in some row; every token column"
                    " has one value per token. The file is damaged; re-run `prep pack`."
                )
        if not np.array_equal(numpy_view(columns[CU_SEQLENS].offsets), seg + np.arange(len(seg))):
            raise ShardIntegrityError(
                f"shard `{path}`: some row's `cu_seqlens` does not have one entry per segment plus one."
                " The file is damaged; re-run `prep pack`."
            )
        # Views of the mapped file, not lists: resident memory must not grow with the number of rows.
        self.tok, self.seg = tok, seg
        # The same offsets read as Python ints (indexing their memoryview, `.data`): no numpy scalar per row.
        self.tok_ints, self.seg_ints = tok.data, seg.data
        for name, column in columns.items():
            setattr(self, name, numpy_view(column.values))
        self.cu_ints = memoryview(self.cu_seqlens)

    @property
    def num_rows(self) -> int:
        return len(self.tok) - 1

    def row(self, local: int) -> PackedRow:
        t0, t1 = self.tok[local], self.tok[local + 1]
        s0, s1 = self.seg[local], self.seg[local + 1]
        return PackedRow(
            self.input_ids[t0:t1],
            self.labels[t0:t1],
            self.position_ids[t0:t1],
            self.cu_seqlens[s0 + local : s1 + local + 1],
            self.doc_ids[s0:s1],
        )


class Shard:
    """One memory-mapped shard file. Rows are addressed 0..num_rows-1 across its record batches."""

    def __init__(self, path: str | Path, info: ShardInfo | None = None) -> None:
        self.path = Path(path)
        self.info = info
        try:
            source = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_stream(source)
            batches = list(reader)
            schema = reader.schema
        except FileNotFoundError as e:
            raise ShardIntegrityError(f"shard `{self.path}` is missing; re-run `prep pack`.") from e
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardIntegrityError(
                f"shard `{self.path}` cannot be read as an Arrow stream ({e}); it is truncated or damaged."
                " Re-run `prep pack` (or restore the file)."
            ) from e
        if not schema.remove_metadata().equals(SHARD_SCHEMA):
            raise ShardIntegrityError(
                f"shard `{self.path}` has the wrong schema ({_schema_difference(schema)}). It was not written"
                " by `prep pack` of this format; re-pack the data."
            )
        self.metadata = read_schema_metadata(schema) or {}
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ShardIntegrityError(
                f"shard `{self.path}` has format_version {self.metadata.get('format_version')!r}; this tool"
                f" reads version {FORMAT_VERSION}. Re-pack the data with this version of `prep pack`."
            )
        for batch in batches:
            # Offsets come from the file; never index with them before Arrow has checked them. Full
            # validation reads only the offsets (one int32 per row or segment), never the token pages.
            try:
                batch.validate(full=True)
            except pa.ArrowInvalid as e:
                raise ShardIntegrityError(
                    f"shard `{self.path}` has an invalid record batch ({e}); it is damaged. Re-run `prep pack`."
                ) from e
        self._batches = batches
        self._batch_starts = [0, *itertools.accumulate(b.num_rows for b in batches)]
        self._rows = [_BatchRows(b, self.path) for b in batches]
        if info is not None and self.num_rows != info.num_rows:
            raise ShardIntegrityError(
                f"shard `{self.path.name}` has {self.num_rows:,} rows but the manifest says {info.num_rows:,};"
                " it does not belong to this dataset. Re-run `prep pack`."
            )

    @property
    def num_rows(self) -> int:
        return self._batch_starts[-1]

    def row(self, index: int) -> PackedRow:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for `{self.path.name}` with {self.num_rows} rows")
        # bisect on a list, not np.searchsorted: the loader calls this per row, and numpy's per-call
        # overhead would be most of the time.
        b = bisect.bisect_right(self._batch_starts, index) - 1
        return self._rows[b].row(index - self._batch_starts[b])

    def __iter__(self) -> Iterator[PackedRow]:
        for i in range(self.num_rows):
            yield self.row(i)

    def row_lengths(self) -> np.ndarray:
        """Tokens per row, for every row, without touching the token pages."""
        return np.concatenate(
            [np.diff(rows.tok).astype(np.int64) for rows in self._rows] or [np.zeros(0, np.int64)]
        )

    def batches(self) -> list[pa.RecordBatch]:
        return list(self._batches)


def _schema_difference(schema: pa.Schema) -> str:
    """The first few ways ``schema`` differs from the shard schema, in one line."""
    found = {f.name: f for f in schema}
    wanted = {f.name: f for f in SHARD_SCHEMA}
    diffs = [f"column `{n}` is missing" for n in wanted if n not in found]
    diffs += [f"unexpected column `{n}`" for n in found if n not in wanted]
    diffs += [
        f"column `{n}` is {found[n].type}{'' if found[n].nullable == f.nullable else ' (nullability differs)'},"
        f" expected {f.type}"
        for n, f in wanted.items()
        if n in found and not found[n].equals(f)
    ]
    if not diffs and [f.name for f in schema] != [f.name for f in SHARD_SCHEMA]:
        diffs.append(f"columns in order {', '.join(schema.names)}, expected {', '.join(SHARD_SCHEMA.names)}")
    return "; ".join(diffs[:4])


class Split:
    """The shards of one split (``train`` or ``val``) in manifest order, addressed as one row range."""

    def __init__(self, name: str, shards: list[Shard]) -> None:
        self.name = name
        self.shards = shards
        self._starts = [0, *itertools.accumulate(s.num_rows for s in shards)]
        # Every record batch of every shard and the split row it starts at: one bisect locates a row.
        self._chunks = [rows for shard in shards for rows in shard._rows]
        self._chunk_starts = [0, *itertools.accumulate(c.num_rows for c in self._chunks)]

    @property
    def num_rows(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[Shard, int]:
        if not 0 <= index < self.num_rows:
            raise IndexError(
                f"row {index} out of range for the `{self.name}` split with {self.num_rows} rows"
            )
        s = bisect.bisect_right(self._starts, index) - 1
        return self.shards[s], index - self._starts[s]

    def row(self, index: int) -> PackedRow:
        shard, local = self.locate(index)
        return shard.row(local)

    def views(self, indices: Iterable[int]) -> RowViews:
        """The rows ``indices`` (Python ints), as :meth:`row` gives them but column by column.

        The loader's hot path: offsets are read as Python ints and no object is built per row (building
        them is much of :meth:`row`'s cost). Also checks that each row's cu_seqlens runs from 0 to its
        length (two ints per row), which the offsets checked on open do not cover.
        """
        views = RowViews([], [], [], [], [], [])
        starts, chunks, num_rows = self._chunk_starts, self._chunks, self.num_rows
        for index in indices:
            if not 0 <= index < num_rows:
                raise IndexError(f"row {index} out of range for the `{self.name}` split with {num_rows} rows")
            k = bisect.bisect_right(starts, index) - 1
            c, local = chunks[k], index - starts[k]
            t0, t1 = c.tok_ints[local], c.tok_ints[local + 1]
            # cu_seqlens has one entry more per row than doc_ids: row `local` starts `local` entries later
            c0, c1 = c.seg_ints[local] + local, c.seg_ints[local + 1] + local
            if t1 <= t0 or c1 <= c0 or c.cu_ints[c0] != 0 or c.cu_ints[c1] != t1 - t0:
                raise ShardIntegrityError(
                    f"row {index} of the `{self.name}` split has {t1 - t0} tokens and cu_seqlens from"
                    f" {c.cu_ints[c0]} to {c.cu_ints[c1]}; expected at least one token and cu_seqlens from 0"
                    " to the row's length. The shard is damaged; run `prep verify` and re-run `prep pack`."
                )
            views.input_ids.append(c.input_ids[t0:t1])
            views.labels.append(c.labels[t0:t1])
            views.position_ids.append(c.position_ids[t0:t1])
            views.cu_seqlens.append(c.cu_seqlens[c0 : c1 + 1])
            views.num_tokens.append(t1 - t0)
            views.num_segments.append(c1 - c0)
        return views

    def row_lengths(self) -> np.ndarray:
        return np.concatenate([s.row_lengths() for s in self.shards] or [np.zeros(0, np.int64)])

    def __iter__(self) -> Iterator[PackedRow]:
        for shard in self.shards:
            yield from shard


class PackedDataset:
    """A packed dataset folder: its manifest and its memory-mapped splits.

    ``verify`` chooses what is checked on open: ``"size"`` (default: every shard exists with the size the
    manifest records, cheap), ``"checksum"`` (also sha256 of every byte: seconds per GiB, as
    `benchmarks/verify_cost.py` measures), or ``"none"``.
    """

    def __init__(self, root: str | Path, *, verify: str = "size") -> None:
        self.root = Path(root)
        self.manifest = Manifest.load(self.root)
        if verify not in ("none", "size", "checksum"):
            raise ValueError(f"verify must be 'none', 'size' or 'checksum', not {verify!r}")
        self._splits: dict[str, Split] = {}
        self._verify = verify

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest.splits)

    def split(self, name: str = "train") -> Split:
        if name not in self.manifest.splits:
            raise DatasetError(
                f"`{self.root}` has no `{name}` split (it has: {', '.join(self.manifest.splits) or 'none'})."
                + (" Pack with `--val-fraction` to make one." if name == "val" else "")
            )
        if name not in self._splits:
            shards = []
            for info in self.manifest.splits[name].shards:
                path = shard_path(self.root, info.file)
                if self._verify != "none":
                    check_shard_file(path, info, checksum=self._verify == "checksum")
                shard = Shard(path, info)
                check_shard_metadata(shard, self.manifest, name)
                shards.append(shard)
            self._splits[name] = Split(name, shards)
        return self._splits[name]


def shard_path(root: Path, file: str) -> Path:
    """The path of shard ``file`` of the dataset in ``root``; refuses one that leads outside the folder.

    The manifest only lists plain file names (:func:`shared.manifest.shard_name_problem`); this also
    refuses a link to a file elsewhere, which no check of the folder would cover.
    """
    path = root / file
    resolved, inside = path.resolve(), root.resolve()
    if resolved.parent != inside:
        raise ShardIntegrityError(
            f"shard `{file}` of `{root}` resolves to `{resolved}`, outside the dataset folder; a dataset reads"
            " only its own files. Copy the file into the folder (not a link to it), or re-run `prep pack`."
        )
    return path


def check_shard_metadata(shard: Shard, manifest: Manifest, split: str) -> None:
    """Raise :class:`ShardIntegrityError` unless the shard says it was packed as the manifest describes.

    Catches a shard copied in from another dataset (another tokenizer, seq_len or EOS) even when its size
    happens to match, without reading a single token.
    """
    t = manifest.tokenizer
    expected = {
        "split": split,
        "seq_len": manifest.seq_len,
        "eos_id": t.eos_id,
        "bos_id": t.bos_id,
        "tokenizer_sha256": t.sha256,
        "vocab_size": t.vocab_size,
    }
    for key, want in expected.items():
        found = shard.metadata.get(key)
        if key == "vocab_size":
            if found is None:
                continue  # shards packed before the key existed; `prep verify` checks it against the tokenizer
            if found != want:
                raise ManifestError(vocab_size_edited(shard.path.parent, manifest, found))
        if found != want:
            what = (
                "was packed with another tokenizer"
                if key == "tokenizer_sha256"
                else "belongs to another dataset"
            )
            raise ShardIntegrityError(
                f"shard `{shard.path.name}`: metadata `{key}` is {_short(found)}, the manifest says"
                f" {_short(want)}; the shard {what}. Re-run `prep pack` (or restore the dataset's own shard)."
            )


def vocab_size_edited(root: Path, manifest: Manifest, actual: int) -> str:
    """The message for a manifest whose `tokenizer.vocab_size` disagrees with the tokenizer it names."""
    return (
        f"`{root / MANIFEST_NAME}`: field `tokenizer.vocab_size` is {manifest.tokenizer.vocab_size:,}, but the"
        f" tokenizer the shards were packed with ({manifest.tokenizer.sha256[:12]}...) has {actual:,} ids;"
        f" the manifest was edited after packing. Restore it (set the field back to {actual}), or re-run"
        " `prep pack`."
    )


def _short(value: object) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else repr(value)


def check_shard_file(path: Path, info: ShardInfo, *, checksum: bool) -> None:
    """Raise :class:`ShardIntegrityError` unless the file matches what the manifest recorded."""
    if not path.exists():
        raise ShardIntegrityError(
            f"shard `{path.name}` listed in the manifest is missing; re-run `prep pack`."
        )
    size = path.stat().st_size
    if size != info.num_bytes:
        raise ShardIntegrityError(
            f"shard `{path.name}`: size mismatch (manifest says {info.num_bytes:,} bytes, file has {size:,})."
            " The file is truncated or changed after packing; re-run `prep pack`."
        )
    if checksum:
        digest = sha256_file(path)
        if digest != info.sha256:
            raise ShardIntegrityError(
                f"shard `{path.name}`: checksum mismatch (manifest says {info.sha256[:12]}..., file is"
                f" {digest[:12]}...). The file changed after packing; re-run `prep pack`."
            )
