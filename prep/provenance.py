"""Provenance: a fingerprint of every input (its size, modification time and sha256), taken while it is read.

The bytes pass through the reader once. A file read in order (JSON lines, JSON, CSV, text, also compressed,
and standard input) is hashed as it streams: :func:`open_hashed` puts the hash between the file on disk and
whatever reads it (the decompressor, the line splitter, the ``csv`` module), so a compressed input's
fingerprint is that of the file on disk, which ``sha256sum`` gives too. A reader that stops short of the end
(a decompressor that leaves the trailer) has the rest hashed when it closes, without error; a file whose size
on disk differs from the bytes read was changed while being read, which is an error.

Parquet and saved datasets are read by pyarrow at random (the footer first, then the text column's pages)
and memory-mapped, which no hash can follow in order. Their files are hashed in order by
:class:`OrderedHash`, which reads on as the batches advance (to the same share of the bytes as of the
rows), so the digest is complete when the last batch is, not in a pass after it. A saved dataset's
fingerprint covers the ``*.arrow`` files of the split read, in sorted order, as one stream (its
``num_bytes`` their total, its ``mtime_ns`` the newest); `datasets`' own ``_fingerprint`` is a hash of
the transforms that made it, not of its content, so it is not used.

A resumed run (``--resume``) reads an input from its start again, skipping the records already done, so the
hash still covers the whole file; the inputs finished before the interruption keep the fingerprints the
journal recorded for them.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from prep.urls import is_url, open_url, url_fs
from shared.errors import UserError

STDIN = "-"
"""The input name that means standard input."""
BLOCK = 1 << 20
"""Bytes read at a time where the hash reads for itself."""


def is_stdin(path: str | Path) -> bool:
    return str(path) == STDIN


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What identifies an input's content: the fields that `InputInfo` records, by the same names."""

    num_bytes: int
    mtime_ns: int | None
    """The file's modification time in ns since the epoch (None for standard input)."""
    sha256: str


class InputDigest:
    """The sha256 of one input's bytes (of several files, for a saved dataset), fed as they are read."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.num_bytes = 0
        self.expected: int | None = 0
        """Sum of the sizes of the files opened (None once standard input is read: it has no size)."""
        self.mtime_ns: int | None = None

    def opened(self, size: int | None, mtime_ns: int | None) -> None:
        """A file to hash was opened, of ``size`` bytes (None: a pipe) and modified at ``mtime_ns``."""
        self.expected = None if size is None or self.expected is None else self.expected + size
        if mtime_ns is not None:
            self.mtime_ns = max(self.mtime_ns or 0, mtime_ns)

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.num_bytes += len(data)

    def fingerprint(self, name: str | Path) -> Fingerprint:
        """The result, once every byte is hashed; ``name`` (the input) for the error if the file changed."""
        if self.expected is not None and self.expected != self.num_bytes:
            raise UserError(
                f"input `{name}` changed while being read: {self.num_bytes:,} bytes read, its size was"
                f" {self.expected:,}. Pack it again once nothing writes to it."
            )
        return Fingerprint(self.num_bytes, self.mtime_ns, self._hash.hexdigest())


class _HashedFile(io.RawIOBase):
    """A binary file whose every byte read also goes into a digest."""

    def __init__(self, f: BinaryIO, digest: InputDigest) -> None:
        self._f = f
        self._digest = digest
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        n = self._f.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._digest.update(memoryview(buffer)[:n])
            self._pos += n
        return n or 0

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed and self._f is not sys.stdin.buffer:
            self._f.close()
        super().close()


def size_of(location: str | Path) -> int:
    """Bytes of a file or URL (0 for standard input, whose size is not known before it is read)."""
    if is_stdin(location):
        return 0
    if is_url(location):
        fs, path = url_fs(str(location))
        return int(fs.size(path))
    return Path(location).stat().st_size


def open_raw(path: str | Path, digest: InputDigest | None) -> BinaryIO:
    """``path`` (standard input for ``-``, an fsspec URL) opened for reading, through ``digest`` if given.

    A URL's modification time is not recorded: filesystems report it in different ways, or not at all.
    """
    if is_url(path):
        f, size = open_url(str(path))
        if digest is None:
            return f
        digest.opened(size, None)
    elif is_stdin(path):
        f: BinaryIO = sys.stdin.buffer
        if digest is None:
            return f
        digest.opened(None, None)
    else:
        if digest is None:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with the wrapper
        st = os.fstat(f.fileno())
        digest.opened(st.st_size, st.st_mtime_ns)
    return io.BufferedReader(_HashedFile(f, digest), buffer_size=BLOCK)  # type: ignore[return-value]


def drain(f: BinaryIO) -> None:
    """Read ``f`` to its end (what a reader left unread still belongs in the fingerprint)."""
    while f.read(BLOCK):
        pass


class OrderedHash:
    """Hashes ``files`` in order, as far along as a reader that reads them out of order has got."""

    def __init__(self, files: list[str | Path], digest: InputDigest) -> None:
        self.files = files
        self.digest = digest
        self.total = sum(size_of(p) for p in files)
        self._next = 0
        self._open: BinaryIO | None = None

    def advance(self, done: int, of: int) -> None:
        """Hash on to ``done / of`` of the bytes (``done`` rows read of ``of``, say)."""
        target = self.total if of <= 0 else self.total * min(done, of) // of
        while self.digest.num_bytes < target:
            if self._open is None:
                if self._next == len(self.files):
                    return  # the files shrank: the fingerprint says so
                self._open = open_raw(self.files[self._next], self.digest)
                self._next += 1
            if not self._open.read(min(BLOCK, target - self.digest.num_bytes)):
                self._open.close()
                self._open = None

    def finish(self) -> None:
        """Hash every byte left, to the end of the last file."""
        if self._open is not None:
            drain(self._open)
            self._open.close()
        for path in self.files[self._next :]:
            with open_raw(path, self.digest) as f:
                drain(f)
        self._next, self._open = len(self.files), None


def fingerprint_files(files: list[str | Path], name: str | Path) -> Fingerprint:
    """The fingerprint of ``files`` read in full (what `prep verify --inputs` compares with the manifest)."""
    digest = InputDigest()
    OrderedHash(files, digest).finish()
    return digest.fingerprint(name)
