"""Compressed inputs: which compression a file's name and first bytes say, and a decompressing stream over it.

A file is read as compressed when its name ends in ``.gz``, ``.bz2``, ``.xz`` or ``.zst``; the suffix before
that one says the format (``a.jsonl.gz`` is JSON lines). The name and the magic bytes must agree: a
``.gz`` file that is not gzip, or an ``a.jsonl`` that starts like a gzip file, is an error rather than
garbage records. ``.zst`` needs the optional ``zstandard`` module.

The stream decompresses as it is read, never holding the whole file; it counts progress in bytes of the
file on disk, so that a run's progress total (the files' sizes) adds up for compressed and plain inputs
alike. Decompression is sequential, so it runs where the file is read; the chunks of lines it yields go
to the workers as those of a plain file do, which keeps the records, and so the shards, the same bytes.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from pathlib import Path
from typing import BinaryIO

from prep.provenance import InputDigest, drain, is_stdin, open_raw, size_of
from shared.errors import UserError

MAGIC = {
    ".gz": (b"\x1f\x8b",),
    # "BZh", the block size, then a first block's magic (pi) or an empty stream's end-of-stream magic (sqrt pi):
    # a text file may begin with "BZh", not with these ten bytes.
    ".bz2": tuple(b"BZh" + bytes([d]) + m for d in b"123456789" for m in (b"1AY&SY", b"\x17rE8P\x90")),
    ".xz": (b"\xfd7zXZ\x00",),
    ".zst": (b"\x28\xb5\x2f\xfd",),
}
"""The compressions read, each with the bytes its files start with."""
DECOMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)
"""What the standard decompressors raise for a damaged or truncated file (zstandard's are added below)."""
try:
    import zstandard as _zstd

    DECOMPRESSION_ERRORS += (_zstd.ZstdError,)
except ImportError:
    pass
NAMES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
ZSTD_FIX = "`pip install zstandard`"


class CompressionError(UserError):
    """A compressed input that cannot be read as its name says."""


def compression_of(path: Path) -> str | None:
    """The compression suffix (``.gz``...) that ``path``'s name ends in, or None."""
    suffix = path.suffix.lower()
    return suffix if suffix in MAGIC else None


def inner_name(path: Path) -> Path:
    """``a.jsonl`` for ``a.jsonl.gz``: the name whose suffix says the format."""
    return path.with_suffix("") if compression_of(path) else path


def magic_of(head: bytes) -> str | None:
    """The compression whose magic bytes ``head`` starts with, or None."""
    return next((c for c, magics in MAGIC.items() if head.startswith(magics)), None)


def check_name_and_magic(location: str | Path) -> str | None:
    """``path``'s compression, once its name and first bytes agree; raise :class:`CompressionError` if not.

    ``location``: a path, or a URL as given (prep/urls.py)."""
    path = Path(location)
    named = compression_of(path)
    try:
        with open_raw(location, None) as f:
            head = f.read(10)
    except OSError:
        return named  # unreadable: the reader names the file and the fix when it gets to it
    found = magic_of(head)
    if named and found != named and head:  # an empty file is an empty input, whatever its name
        what = f"starts like a {NAMES[found]} file" if found else "does not start with its magic bytes"
        raise CompressionError(
            f"input `{location}` is named as {NAMES[named]} ({named}) but {what}. Rename it to what it holds,"
            f" or compress it again (e.g. `{NAMES[named]} -t {path}` tests it)."
        )
    if not named and found:
        raise CompressionError(
            f"input `{location}` is {NAMES[found]}-compressed but its name does not end in {found}. Rename it to"
            f" `{path.name}{found}` so that it is read decompressed."
        )
    if named == ".zst":
        _zstandard(path)
    return named


def _zstandard(path: Path):
    try:
        import zstandard
    except ImportError:
        raise CompressionError(
            f"input `{path}` is zstd-compressed, and reading .zst needs the `zstandard` module: {ZSTD_FIX},"
            f" or unpack it (`unzstd {path}`)."
        ) from None
    return zstandard


class InputStream:
    """A file opened for reading, decompressed as read if its name says so; it knows how much of the file
    on disk it has consumed (:meth:`consumed`), for progress.

    With a ``digest``, every byte of the file on disk goes into it (prep/provenance.py): those the reader
    consumed, and, when the ``with`` block ends without an error, the rest of the file. ``-`` is standard
    input, decompressed when its first bytes are a compression's magic; its size is unknown, 0 here.
    """

    def __init__(self, path: str | Path, digest: InputDigest | None = None) -> None:
        self.raw: BinaryIO = open_raw(path, digest)
        self.digest = digest
        self.stdin = is_stdin(path)
        self.size = size_of(path)
        compression = compression_of(Path(path))
        if self.stdin:
            # A pipe has no name to say its compression: its magic bytes do (`cat a.jsonl.gz | prep pack -`).
            if not isinstance(self.raw, io.BufferedReader):
                self.raw = io.BufferedReader(self.raw)  # type: ignore[arg-type] - to peek without taking
            compression = magic_of(self.raw.peek(10)[:10])
        if compression is None:
            self.stream: BinaryIO = self.raw
        elif compression == ".zst":
            # Buffered: zstandard's reader has no readline, which a resume uses to skip records.
            reader = (
                _zstandard(Path(path)).ZstdDecompressor().stream_reader(self.raw, read_across_frames=True)
            )
            self.stream = io.BufferedReader(reader)
        elif compression == ".gz":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        else:
            self.stream = {".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}[compression](self.raw, mode="rb")
        self.compressed = compression is not None and not self.stdin
        """Whether progress counts bytes of the file on disk rather than those read (a pipe has no size)."""
        self.out = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.out += len(data)
        return data

    def readline(self) -> bytes:
        line = self.stream.readline()
        self.out += len(line)
        return line

    def consumed(self) -> int:
        """Bytes of the file on disk read so far (the decompressor reads ahead in blocks)."""
        return self.raw.tell() if self.compressed else self.out

    def remaining(self) -> int:
        """About how many bytes reading on yields: exact for a plain file, scaled by the ratio so far if not."""
        if self.stdin:
            return 1 << 62  # unknown: as if much is left, so chunks keep their full size
        left = max(0, self.size - self.consumed())
        if not self.compressed:
            return left
        return left * max(1, self.out // max(1, self.consumed()))

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        if not self.stdin or self.digest is not None:  # the wrapper, not standard input itself
            self.raw.close()

    def __enter__(self) -> InputStream:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None and self.digest is not None:
                drain(self.raw)  # what the reader left (a trailer, a JSON array's tail) is the file's too
        finally:
            self.close()
