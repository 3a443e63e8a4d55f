"""Streaming document readers: JSONL/JSON, Parquet, plain text, and datasets saved with `save_to_disk`.

Each reader yields one :class:`Record` per input record, in file order, without holding more than one
batch in memory. A record that cannot be used carries the reason instead of text; the pipeline decides
whether that stops the run (the default) or is counted as skipped (``--skip-invalid``). Nothing is
dropped silently: every record read becomes a document id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from prep import hub
from prep.chat_record import ChatError, chat_record
from prep.compressed import DECOMPRESSION_ERRORS, InputStream, inner_name
from prep.provenance import InputDigest, OrderedHash, is_stdin, open_raw, size_of
from prep.urls import is_url
from shared.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
CSV_SUFFIXES = (".csv", ".tsv")
SUPPORTED = JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES + CSV_SUFFIXES

# Why a record carries no text. `empty` is counted and skipped by default; the others stop the run
# unless `--skip-invalid` is given.
EMPTY = "empty"
MISSING_FIELD = "missing_field"
INVALID = "invalid"


T = TypeVar("T")

RECORD_FORMATS = ("text", "chat", "prompt-completion")
"""What a record holds: a document's text, a conversation (`messages`), or a `prompt`/`completion` pair."""


class Field(str):
    """The field a record's value is read from, and which :data:`RECORD_FORMATS` that value has.

    It is the field's name (a ``str``, so every reader and message takes it as before); a conversation or a
    prompt/completion pair becomes the record's text as canonical JSON (:func:`structured_text`), which the
    chat encoder (prep/chat_pack.py) decodes again. ``prompt-completion`` reads the fields `prompt` and
    `completion`, whatever the name.
    """

    kind: str

    def __new__(cls, name: str, kind: str = "text") -> Field:
        field = super().__new__(cls, name)
        field.kind = kind
        return field

    def __reduce__(self) -> tuple:
        return (Field, (str(self), self.kind))

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a tabular reader reads for this field."""
        return PAIR_FIELDS if self.kind == "prompt-completion" else (str(self),)


PAIR_FIELDS = ("prompt", "completion")


def record_kind(text_field: str) -> str:
    """The record format of ``text_field``: a :class:`Field`'s kind, else ``text``."""
    return getattr(text_field, "kind", "text")


def structured_text(value: object, kind: str) -> tuple[str | None, str]:
    """A conversation or a prompt/completion pair as canonical JSON text, or ``(None, why it is not one)``.

    Conversations keep every message's `role` and `content` (both strings); the chat encoder checks the
    rest. An empty conversation, or a pair whose completion is empty, is no text (counted as empty).
    """
    if kind == "chat":
        return _conversation_text(value)
    prompt, completion = value if isinstance(value, tuple) else (None, None)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return None, f"`prompt` and `completion` must be strings, got {_kind(prompt)} and {_kind(completion)}"
    if not completion.strip():
        return "", ""
    return json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False), ""


def _conversation_text(value: object) -> tuple[str | None, str]:
    """A conversation's canonical JSON: the messages list, or ``{"messages", "tools"}`` when the record has
    tools (:func:`prep.chat_record.chat_record` reads both). A message of only string `role` and `content`
    keeps exactly those two keys (fields that are null, as Parquet structs carry them, are dropped), so such
    conversations keep the text, and the train/val hash, they always had."""
    tools = None
    if isinstance(value, tuple):  # (messages, tools) of a JSON object with `tools`
        value, tools = value
    if hasattr(value, "tolist"):  # a numpy array of a datasets column
        value = value.tolist()
    if not isinstance(value, list):
        return None, f"is {_kind(value)}, not a list of {{role, content}} messages"
    if isinstance(tools, str):  # many datasets store the schemas as JSON text
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            return None, f"has `tools` that are not valid JSON ({e})"
    messages = [_canonical_message(m) for m in value]
    if not messages:
        return "", ""
    try:
        chat_record({"messages": messages, "tools": tools})
    except ChatError as e:
        return None, f"is not a conversation this project renders: {e}"
    return json.dumps(
        messages if tools is None else {"messages": messages, "tools": tools}, ensure_ascii=False
    ), ""


def _canonical_message(m: object) -> object:
    if not isinstance(m, dict):
        return m
    kept = {k: v for k, v in m.items() if v is not None or k == "content"}
    if isinstance(kept.get("role"), str) and isinstance(kept.get("content"), str) and len(kept) == 2:
        return {"role": kept["role"], "content": kept["content"]}
    return kept


FIELD_FIX = "set `--text-field` (or, for a mixture source, its own `text_field`)"
"""The fix for a text field that is not there: a mixture source's `text_field` overrides the flag."""


class InputError(UserError):
    """An input file, or a record in it, cannot be read."""


@dataclass(frozen=True, slots=True)
class Record:
    text: str | None
    problem: str | None
    """None, EMPTY, MISSING_FIELD or INVALID."""
    where: str
    """`file:line` (or `file:row N`) for messages."""
    detail: str = ""


def content_hash(text: str) -> int:
    """A document's 64-bit content hash: what the `val` split and a mixture's sample are chosen by."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def is_val(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to `val`: a function of its content alone, independent of order and runs."""
    if val_fraction <= 0.0:
        return False
    return content_hash(text) < val_fraction * 2.0**64


@dataclass(frozen=True, slots=True)
class BatchRecords:
    """What packing needs of a batch of records once their texts are tokenized: everything but the texts.

    Made where the records are (:func:`summarize`): in the reading process, or in the worker that decoded
    and tokenized a JSONL chunk, which then sends back this instead of every text.
    """

    num_records: int
    problems: tuple[tuple[int, Record], ...]
    """``(index in the batch, record)`` of each record without text, in order."""
    is_val: np.ndarray
    """int8, for each record with text in order: 1 if it belongs to the `val` split."""
    doc_hash: np.ndarray | None = None
    """uint64, each text's :func:`content_hash`, when a mixture needs it (else None: not computed)."""

    def text_index(self) -> np.ndarray:
        """int64, index in the batch of each record with text (the texts the tokenizer saw, in order)."""
        return np.delete(np.arange(self.num_records, dtype=np.int64), [i for i, _ in self.problems])


def summarize(records: list[Record], val_fraction: float, hashes: bool = False) -> BatchRecords:
    """The :class:`BatchRecords` of ``records``; ``hashes``: keep each text's content hash too."""
    texts = [r.text for r in records if r.text is not None]
    doc_hash = None
    if hashes:
        values = [content_hash(t) for t in texts]
        # The same comparison as is_val (an int against a float, exact), so a mixture moves no document.
        flags = [val_fraction > 0 and h < val_fraction * 2.0**64 for h in values]
        doc_hash = np.array(values, dtype=np.uint64)
    else:
        flags = [is_val(t, val_fraction) for t in texts] if val_fraction > 0 else [False] * len(texts)
    return BatchRecords(
        num_records=len(records),
        problems=tuple((i, r) for i, r in enumerate(records) if r.text is None),
        is_val=np.array(flags, dtype=np.int8),
        doc_hash=doc_hash,
    )


@dataclass(frozen=True, slots=True)
class InputFile:
    path: Path
    format: str
    """`jsonl`, `json`, `parquet`, `text`, `csv`, `tsv`, `arrow-dataset` or `hf-dataset` (prep/hub.py)."""
    dataset_split: str | None = None
    """The split to read of a saved DatasetDict (prep/discovery.py chooses it)."""
    url: str | None = None
    """The fsspec URL it is read from, as given (prep/urls.py); ``path`` then holds it only for its name."""

    @property
    def location(self) -> str | Path:
        """What the readers open: the URL, or the path."""
        return self.url or self.path

    @property
    def name(self) -> str:
        """The input as the manifest and messages name it."""
        return self.url or str(self.path)

    text_field: str | None = None
    """This file's text field when its mixture source names one; None: `--text-field`."""
    source: str | None = None
    """The mixture source (prep/recipe.py) the file belongs to; None without a mixture."""

    @property
    def num_bytes(self) -> int:
        """Its size on disk (0 for standard input, whose size is not known before it is read)."""
        return sum(size_of(p) for p in self.files())

    def files(self) -> list[str | Path]:
        """The files it is read from: itself (a path, a URL, stdin), a saved dataset's Arrow files, sorted,
        or those of a Hub dataset's split in the `datasets` cache, in its order."""
        if self.url or is_stdin(self.path):
            return [self.location]
        if self.format == hub.FORMAT:
            assert self.dataset_split is not None, self
            return hub.arrow_files(hub.hub_name(self.path), self.dataset_split)
        if self.path.is_dir():
            folder = self.path / self.dataset_split if self.dataset_split else self.path
            return sorted(folder.rglob("*.arrow"))
        return [self.path]


def read_records(
    source: InputFile,
    text_field: str,
    on_bytes: Callable[[int], None],
    digest: InputDigest | None = None,
) -> Iterator[Record]:
    """All records of one input, in order. ``on_bytes`` is told how many input bytes each step consumed;
    ``digest``, when given, gets every byte of the input (prep/provenance.py) by the time the last record
    is read."""
    readers = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "parquet": _read_parquet,
        "text": _read_text,
        "csv": _read_csv,
        "tsv": _read_csv,
    }
    if source.format in ("arrow-dataset", hub.FORMAT):
        records = _read_dataset(source, text_field, on_bytes, digest)
    else:
        records = readers[source.format](source.location, text_field, on_bytes, digest)
    yield from _named_errors(source, records)


def read_jsonl_chunks(
    source: InputFile,
    on_bytes: Callable[[int], None],
    *,
    size: int,
    skip: int = 0,
    spread: int = 1,
    digest: InputDigest | None = None,
) -> Iterator[tuple[int, bytes]]:
    """:func:`jsonl_chunks` of a ``jsonl`` input, its read errors reported as :func:`read_records` does."""
    assert source.format == "jsonl", source
    chunks = jsonl_chunks(source.location, on_bytes, size=size, skip=skip, spread=spread, digest=digest)
    yield from _named_errors(source, chunks)


def _named_errors(source: InputFile, items: Iterator[T]) -> Iterator[T]:
    """``items``, with an OS error while reading them turned into an :class:`InputError` naming the file."""
    try:
        yield from items
    except PermissionError as e:
        raise InputError(f"cannot read `{source.name}`: permission denied. Fix its permissions.") from e
    except IsADirectoryError as e:
        raise InputError(
            f"`{source.name}` is a folder, not a {source.format} file. Pass the files inside it, or rename it."
        ) from e
    except DECOMPRESSION_ERRORS as e:
        raise InputError(
            f"`{source.name}` cannot be decompressed ({type(e).__name__}: {str(e)[:160]}); it is damaged or"
            " cut short. Compress it again from the original, or pass the uncompressed file."
        ) from e
    except OSError as e:
        # Device errors, vanished network mounts, special files: name the file rather than show a traceback.
        raise InputError(
            f"cannot read `{source.name}` ({e.strerror or e}). Check the file and the disk it is on."
        ) from e


def _from_value(obj: object, text_field: str, where: str) -> Record:
    if not isinstance(obj, dict):
        return Record(None, INVALID, where, f"expected a JSON object, found {type(obj).__name__}")
    if record_kind(text_field) == "prompt-completion":
        if missing := [k for k in PAIR_FIELDS if k not in obj]:
            keys = ", ".join(list(obj)[:8])
            return Record(None, MISSING_FIELD, where, f"no `{missing[0]}` field (fields: {keys})")
        return _from_text_value((obj["prompt"], obj["completion"]), text_field, where)
    if record_kind(text_field) == "chat" and obj.get("tools") is not None and text_field in obj:
        return _from_text_value(
            (obj[text_field], obj["tools"]), text_field, where
        )  # tools beside the messages
    if text_field not in obj and "." in text_field:
        return _from_path(obj, text_field, where)
    if text_field not in obj:
        keys = ", ".join(list(obj)[:8])
        return Record(None, MISSING_FIELD, where, f"no `{text_field}` field (fields: {keys}); {FIELD_FIX}")
    return _from_text_value(obj[text_field], text_field, where)


def _from_path(obj: dict, text_field: str, where: str) -> Record:
    """The text at a dotted path (``content.body``) into nested objects; a key holding the dots wins."""
    value: object = obj
    parent: dict = obj
    names = text_field.split(".")
    for depth, name in enumerate(names):
        inside = ".".join(names[:depth]) or "the record"
        if not isinstance(value, dict):
            return Record(None, INVALID, where, f"`{inside}` is {_kind(value)}, not an object with `{name}`")
        if name not in value:
            keys = ", ".join(list(value)[:8])
            return Record(
                None,
                MISSING_FIELD,
                where,
                f"no `{text_field}` field: {inside} has no `{name}` (fields: {keys}); {FIELD_FIX}",
            )
        parent, value = value, value[name]
    if record_kind(text_field) == "chat" and parent.get("tools") is not None:  # tools beside the messages
        value = (value, parent["tools"])
    return _from_text_value(value, text_field, where)


def _from_text_value(text: object, text_field: str, where: str) -> Record:
    if text is None:
        return Record(None, MISSING_FIELD, where, f"`{text_field}` is null")
    if (kind := record_kind(text_field)) != "text":
        text, why = structured_text(text, kind)
        if text is None:
            return Record(None, INVALID, where, f"`{text_field}` {why}")
    if not isinstance(text, str):
        return Record(None, INVALID, where, f"`{text_field}` is {_kind(text)}, not a string")
    return _text_record(text, where)


def _lone_surrogate(text: str) -> str | None:
    """Describe a lone UTF-16 surrogate (a JSON `\\ud800` escape without its pair), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"`\\u{ord(text[e.start]):04x}` at character {e.start} is half a UTF-16 surrogate pair, not text"
        )
    return None


def _kind(value: object) -> str:
    """`an int` rather than `a int`: the value's type as a message names it."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _text_record(text: str, where: str) -> Record:
    if not text.strip():
        return Record(None, EMPTY, where)
    return Record(text, None, where)


BOM = b"\xef\xbb\xbf"
"""A UTF-8 byte-order mark: not part of a file's first record."""


def jsonl_chunks(
    path: str | Path,
    on_bytes: Callable[[int], None],
    *,
    size: int = 4 << 20,
    skip: int = 0,
    spread: int = 1,
    digest: InputDigest | None = None,
) -> Iterator[tuple[int, bytes]]:
    """``(number of its first line, bytes)`` of whole lines of a JSONL file, about ``size`` bytes at a time.

    :func:`jsonl_chunk_lines` splits a chunk into records and :func:`jsonl_record` decodes each one,
    wherever that runs: ``prep pack`` hands the chunks to the worker processes that tokenize them, so
    that the one process reading the input does no work per record. ``skip`` records (lines that are
    not blank) are passed over first, to resume after them. With ``spread`` workers, chunks shrink
    near the end of the file (to a ``2 * spread``-th of what is left, down to ``size / 8``), so that
    the workers finish together rather than one after the other on the last big chunks. ``digest``: see
    :func:`read_records`.
    """
    with InputStream(path, digest) as f:
        reported = 0

        def report(num_bytes: int) -> None:
            # A compressed file's progress is in bytes of the file on disk, as the run's total is.
            nonlocal reported
            if f.compressed:
                num_bytes = (f.size if num_bytes < 0 else f.consumed()) - reported
            reported += num_bytes
            on_bytes(num_bytes)

        line_no, skipped = 1, 0
        while skip:  # resuming: the records already done, line by line (a rare, one-off cost)
            raw = f.readline()
            if not raw:
                break
            skipped += len(raw)
            if skipped >= size:  # a progress update costs more than a line: not one per line
                report(skipped)
                skipped = 0
            skip -= bool((raw[3:] if line_no == 1 and raw.startswith(BOM) else raw).strip())
            line_no += raw.endswith(b"\n")
        if skipped:
            report(skipped)
        pieces: list[bytes] = []  # a line longer than `size` arrives in several reads
        while data := f.read(max(1, size // 8, min(size, f.remaining() // (2 * spread)))):
            end = data.rfind(b"\n") + 1
            if not end:
                pieces.append(data)
                continue
            chunk = b"".join([*pieces, data[:end]])
            pieces = [data[end:]] if end < len(data) else []
            report(len(chunk))
            yield line_no, chunk
            line_no += chunk.count(b"\n")
        if pieces:
            chunk = b"".join(pieces)
            report(len(chunk))
            yield line_no, chunk
        if f.compressed:
            report(-1)  # the rest of the file on disk: the trailer, and what the decompressor read ahead


def jsonl_chunk_lines(first_line: int, chunk: bytes) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of every record in a chunk of :func:`jsonl_chunks`: its lines that are not blank."""
    if first_line == 1 and chunk.startswith(BOM):
        chunk = chunk[len(BOM) :]
    for line_no, raw in enumerate(chunk.split(b"\n"), start=first_line):
        if raw.strip():
            yield line_no, raw


_decode_json = json.JSONDecoder().decode


def jsonl_record(path: str, line_no: int, raw: bytes, text_field: str) -> Record:
    """The record on line ``line_no`` of the JSONL file ``path``, whose bytes are ``raw``.

    The bytes must be strict UTF-8: ``json.loads`` on bytes would also accept an encoded surrogate
    (``ED A0 80``) and hand the tokenizer a lone surrogate, which no tokenizer takes.
    """
    where = f"{path}:{line_no}"
    try:
        text = raw.decode("utf-8")
        obj = _decode_json(text[1:] if text.startswith("\ufeff") else text)  # a BOM, as json.loads allows
    except UnicodeDecodeError as e:
        return Record(None, INVALID, where, f"invalid UTF-8 at byte {e.start} of the line")
    except json.JSONDecodeError as e:
        return Record(None, INVALID, where, f"malformed JSON ({e.msg}, column {e.colno})")
    except (ValueError, RecursionError) as e:  # e.g. a 5,000-digit number, arrays nested 100,000 deep
        return Record(None, INVALID, where, f"JSON that cannot be decoded ({str(e)[:120]})")
    record = _from_value(obj, text_field, where)
    if record.text is not None and b"\\u" in raw and (problem := _lone_surrogate(record.text)):
        return Record(None, INVALID, where, problem)
    return record


def _read_jsonl(
    path: str | Path, text_field: str, on_bytes: Callable[[int], None], digest: InputDigest | None
) -> Iterator[Record]:
    name = str(path)
    for first_line, chunk in jsonl_chunks(path, on_bytes, digest=digest):
        for line_no, raw in jsonl_chunk_lines(first_line, chunk):
            yield jsonl_record(name, line_no, raw, text_field)


def _read_json(
    path: str | Path, text_field: str, on_bytes: Callable[[int], None], digest: InputDigest | None
) -> Iterator[Record]:
    with InputStream(path) as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, text_field, on_bytes, digest)
        return
    # A top-level JSON array cannot be parsed incrementally with the standard library; such files are
    # read whole. Use JSON lines for corpora larger than memory.
    data = _read_whole(path, on_bytes, digest)
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:  # includes UnicodeDecodeError and JSONDecodeError
        raise InputError(
            f"`{path}` is not valid JSON ({str(e)[:200]}). Fix the file or convert it to JSON lines."
        ) from e
    for i, obj in enumerate(items):
        record = _from_value(obj, text_field, f"{path}:item {i}")
        if record.text is not None and (problem := _lone_surrogate(record.text)):
            record = Record(None, INVALID, record.where, problem)
        yield record


def _read_text(
    path: str | Path, text_field: str, on_bytes: Callable[[int], None], digest: InputDigest | None
) -> Iterator[Record]:
    data = _read_whole(path, on_bytes, digest)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Record(
            None,
            INVALID,
            str(path),
            f"invalid UTF-8 at byte {e.start} (convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`)",
        )
        return
    yield _text_record(text, str(path))


def _read_csv(
    path: str | Path, text_field: str, on_bytes: Callable[[int], None], digest: InputDigest | None
) -> Iterator[Record]:
    """The rows of a CSV (or, named .tsv, tab-separated) file with a header row, streamed; the column
    ``text_field`` is the text. A row the csv module cannot parse, or of the wrong width, is a bad record."""
    # A document may be longer than the csv module's default field limit (128 KiB).
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    delimiter = "\t" if inner_name(Path(path)).suffix.lower() == ".tsv" else ","
    with InputStream(path, digest) as f:
        # surrogateescape: a row that is not UTF-8 becomes a bad record, not the end of the file.
        text = io.TextIOWrapper(f.stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        rows = csv.reader(text, delimiter=delimiter)
        header = next(rows, None)
        if header is None or text_field not in header:
            columns = ", ".join(header or []) or "none: the file is empty"
            raise InputError(f"`{path}` has no `{text_field}` column (columns: {columns}); {FIELD_FIX}.")
        column, width, line_no = header.index(text_field), len(header), rows.line_num + 1
        reported = reported_at = 0
        while True:
            try:
                row = next(rows, None)
            except csv.Error as e:
                yield Record(None, INVALID, f"{path}:{line_no}", f"a row the csv module cannot read ({e})")
                line_no = rows.line_num + 1
                continue
            if row is None:
                break
            if row:  # a blank line is not a record, as in JSON lines
                yield _csv_record(row, column, width, text_field, f"{path}:{line_no}")
            line_no = rows.line_num + 1
            if line_no - reported_at >= 4096:  # a progress update costs more than a row: not one per row
                reported_at = line_no
                reported += (n := f.raw.tell() - reported)
                on_bytes(n)
    on_bytes(f.size - reported)


def _csv_record(row: list[str], column: int, width: int, text_field: str, where: str) -> Record:
    if len(row) != width:
        return Record(None, INVALID, where, f"{len(row)} fields, the header has {width}")
    value = row[column]
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return Record(None, INVALID, where, f"invalid UTF-8 at character {e.start} of `{text_field}`")
    return _text_record(value, where)


def _read_whole(path: str | Path, on_bytes: Callable[[int], None], digest: InputDigest | None) -> bytes:
    """The bytes of a file read whole (one text, or a JSON array), decompressed if its name says so."""
    with InputStream(path, digest) as f:
        data = f.read()
    on_bytes(f.size)
    return data


def _column_records(column: list, start_row: int, path: str | Path, text_field: str) -> Iterator[Record]:
    for i, text in enumerate(column):
        where = f"{path}:row {start_row + i}"
        if record_kind(text_field) != "text" and not isinstance(text, NotUtf8):
            yield _from_text_value(text, text_field, where)
        elif text is None:
            yield Record(None, MISSING_FIELD, where, f"`{text_field}` is null")
        elif isinstance(text, NotUtf8):
            yield Record(None, INVALID, where, f"invalid UTF-8 at byte {text.error_at} of `{text_field}`")
        elif not isinstance(text, str):
            yield Record(None, INVALID, where, f"`{text_field}` is {_kind(text)}, not a string")
        else:
            yield _text_record(text, where)


class NotUtf8(bytes):
    """A string value whose bytes are not UTF-8 (Parquet does not enforce it); a record to refuse or skip."""

    @property
    def error_at(self) -> int:
        try:
            self.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start
        return -1


def _strings(column) -> list:
    """The column's values (a pyarrow array); a string value that is not UTF-8 comes back as :class:`NotUtf8`."""
    import pyarrow as pa

    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        raw = column.view(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        return [v if v is None else _utf8_or_not(v) for v in raw.to_pylist()]


def _utf8_or_not(raw: bytes) -> str | NotUtf8:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return NotUtf8(raw)


def _read_parquet(
    path: str | Path, text_field: str, on_bytes: Callable[[int], None], digest: InputDigest | None
) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(open_raw(path, None) if is_url(path) else path)
    except Exception as e:  # pyarrow raises several types for a damaged footer
        raise InputError(f"`{path}` is not a readable Parquet file ({e}).") from e
    columns = list(text_field.columns if isinstance(text_field, Field) else (text_field,))
    if missing := [c for c in columns if c not in pf.schema_arrow.names]:
        raise InputError(
            f"`{path}` has no `{missing[0]}` column (columns: {', '.join(pf.schema_arrow.names)});"
            f" {FIELD_FIX}."
        )
    _refuse_tools_column(text_field, pf.schema_arrow.names, str(path))
    row = 0
    total = size_of(path)
    hashed = None if digest is None else OrderedHash([path], digest)
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        values = [_strings(batch.column(k)) for k in range(len(columns))]
        column = values[0] if len(values) == 1 else list(zip(*values, strict=True))
        yield from _column_records(column, row, path, text_field)
        row += batch.num_rows
        on_bytes(total * batch.num_rows // max(pf.metadata.num_rows, 1))
        if hashed is not None:
            hashed.advance(row, pf.metadata.num_rows)
    if hashed is not None:
        hashed.finish()


def _refuse_tools_column(text_field: str, names: list[str], label: str) -> None:
    """Conversations in a table are read from their messages column alone: a `tools` column beside it
    would be left out of the rendering, so it is refused rather than lost."""
    if record_kind(text_field) == "chat" and "tools" in names:
        raise InputError(
            f"`{label}` has a `tools` column: tools are read from JSON and JSONL records only. Convert the"
            ' input to JSONL (`{"messages": [...], "tools": [...]}` per line).'
        )


def _load_saved(source: InputFile):
    """A saved Dataset, or the one split of a saved DatasetDict that discovery chose; and its name for messages."""
    import datasets

    path, name = source.path, source.dataset_split
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets and pyarrow raise many types for a damaged folder
        raise InputError(
            f"dataset `{path}` cannot be loaded ({type(e).__name__}: {str(e)[:200]}). Save it again with"
            " `datasets.save_to_disk`."
        ) from e
    if isinstance(loaded, datasets.DatasetDict) != (name is not None):
        raise InputError(
            f"dataset `{path}` changed while being read (it is {'no longer ' if name else ''}a DatasetDict);"
            " run the command again."
        )
    return (loaded[name] if name is not None else loaded), (path / name if name else path)


def _read_dataset(
    source: InputFile, text_field: str, on_bytes: Callable[[int], None], digest: InputDigest | None
) -> Iterator[Record]:
    """The records of a saved dataset (:func:`_load_saved`) or of a Hub dataset's split (prep/hub.py)."""
    import pyarrow as pa

    if source.format == hub.FORMAT:
        assert source.dataset_split is not None, source
        ds = hub.split(hub.hub_name(source.path), source.dataset_split)
        label = f"{source.path} (split {source.dataset_split})"
    else:
        ds, label = _load_saved(source)
    columns = list(text_field.columns if isinstance(text_field, Field) else (text_field,))
    if missing := [c for c in columns if c not in ds.column_names]:
        raise InputError(
            f"dataset `{label}` has no `{missing[0]}` column (columns: {', '.join(ds.column_names)});"
            f" {FIELD_FIX}."
        )
    _refuse_tools_column(text_field, ds.column_names, label)
    # The Arrow files' offsets come from disk: check them (and the UTF-8) before any read trusts them,
    # so a damaged file is an error instead of text read from outside its buffers.
    try:
        for name in columns:
            ds.data.table.column(name).validate(full=True)
    except pa.ArrowInvalid as e:
        raise InputError(
            f"dataset `{label}`: column `{text_field}` is damaged ({e})."
            " Save the dataset again with `datasets.save_to_disk`."
        ) from e
    total = max(len(ds), 1)
    num_bytes = source.num_bytes
    hashed = None if digest is None else OrderedHash(source.files(), digest)
    for start in range(0, len(ds), 4096):
        block = ds[start : start + 4096]
        values = [block[name] for name in columns]
        column = values[0] if len(values) == 1 else list(zip(*values, strict=True))
        yield from _column_records(column, start, label, text_field)
        on_bytes(num_bytes * len(column) // total)
        if hashed is not None:
            hashed.advance(start + len(column), len(ds))
    if hashed is not None:
        hashed.finish()


def first_record(source: InputFile) -> dict | None:
    """The first record of ``source`` as an object (a JSON object, a table's first row), to tell its format;
    ``None`` for text and CSV inputs, whose records are text, and for an input without a readable record
    (reading it then says what is wrong, with the file's name). Standard input, URLs and Hub datasets are
    not peeked at (stdin cannot be read twice): they are text under ``--format auto``; name their format."""
    if is_stdin(source.path) or source.url or source.format == hub.FORMAT:
        return None
    try:
        return _first_record(source)
    except (OSError, *DECOMPRESSION_ERRORS):
        return None


def _first_record(source: InputFile) -> dict | None:
    if source.format in ("jsonl", "json"):
        with InputStream(source.path) as f:
            head = f.read(64).lstrip(BOM).lstrip()
        if source.format == "json" and head.startswith(b"["):
            try:
                items = json.loads(_read_whole(source.path, lambda n: None, None).decode("utf-8-sig"))
            except (ValueError, RecursionError):
                return None  # the reader says what is wrong with it
            return items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else None
        for first_line, chunk in jsonl_chunks(source.path, lambda n: None, size=1 << 16):
            for _, raw in jsonl_chunk_lines(first_line, chunk):
                try:
                    obj = json.loads(raw)
                except (ValueError, RecursionError):
                    return None
                return obj if isinstance(obj, dict) else None
        return None
    if source.format == "parquet":
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(source.path).iter_batches(batch_size=1), None)
        except Exception:  # the reader says what is wrong with it
            return None
        return batch.to_pylist()[0] if batch is not None and batch.num_rows else None
    if source.format == "arrow-dataset":
        import datasets

        try:
            loaded = datasets.load_from_disk(str(source.path))
            ds = loaded[source.dataset_split] if source.dataset_split else loaded
            return ds[0] if len(ds) else None
        except Exception:
            return None
    return None
