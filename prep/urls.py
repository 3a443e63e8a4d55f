"""Inputs named by an fsspec URL (``s3://``, ``gs://``, ``hf://``, ``file://``, ``memory://``...).

A URL names a file, or files by a glob (``s3://bucket/news/*.jsonl.gz``, taken in sorted order), of the
formats read from disk, compressed or not; it is opened through fsspec, which streams it as a local file is
streamed, and Parquet is read by pyarrow through the same file object. A folder URL is refused (name its
files, or a glob). The filesystem's package (``s3fs``, ``gcsfs``, ``huggingface_hub`` for ``hf://``) and
its credentials are the user's configuration; a missing one is an error that names it.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from shared.errors import UserError


class UrlError(UserError):
    """An input URL that cannot be read."""


def is_url(location: object) -> bool:
    """Whether ``location`` (a string as given, not a ``Path``, which would fold the ``//``) is a URL."""
    return isinstance(location, str) and "://" in location


def url_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it of ``url``; a :class:`UrlError` saying the fix if none."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec knows the protocol, its package is not installed
        raise UrlError(
            f"input `{url}`: {e} (`pip install` the package fsspec names), or copy the file here and pass its path."
        ) from None
    except ValueError as e:
        raise UrlError(
            f"input `{url}`: {e}. Use a scheme fsspec knows (s3://, gs://, hf://, file://, memory://...),"
            " or a local path."
        ) from None


def expand(spec: str) -> list[str]:
    """The file URLs ``spec`` names: itself, or a glob's matches in sorted order."""
    fs, path = url_fs(spec)
    try:
        if any(c in path for c in "*?["):
            urls = [fs.unstrip_protocol(p) for p in sorted(fs.glob(path)) if not fs.isdir(p)]
            if not urls:
                raise UrlError(f"input `{spec}` matches no files; check the pattern (quote it in the shell).")
            return urls
        if not fs.exists(path):
            raise UrlError(f"input `{spec}` does not exist; check the URL.")
        if fs.isdir(path):
            raise UrlError(
                f"input `{spec}` is a folder; name its files, or a glob such as `{spec.rstrip('/')}/*.jsonl`."
            )
    except OSError as e:  # permissions, credentials, the network: the filesystem's own words
        raise UrlError(f"input `{spec}` cannot be listed ({type(e).__name__}: {str(e)[:200]}).") from e
    return [spec]


def open_url(url: str) -> tuple[BinaryIO, int]:
    """``url`` opened for reading in binary, and its size in bytes."""
    fs, path = url_fs(url)
    return fs.open(path, "rb"), int(fs.size(path))
