"""Input discovery: the files `prep pack` reads for the inputs it is given, and those it ignores and why.

The rule, in one place (``prep verify --source`` applies it again to find the same files):

- ``-`` is standard input, read as JSON lines (``./-`` is a file named ``-``), at most once per run.
- A URL (``s3://``, ``gs://``, ``hf://``, ``file://``, ``memory://``: what fsspec opens) names a file or, by a
  glob, files of the types below, read through fsspec (prep/urls.py); a folder URL is an error.
- ``hf:ORG/NAME`` is a Hugging Face dataset by name, read through `datasets` (prep/hub.py; ``./hf:x`` is a
  file); a DatasetDict rule as below chooses its split.
- An input that exists is that path, whatever its name holds (``data[1].jsonl`` is that file). Only an
  input that does not exist is a glob pattern; its matches are taken in sorted order.
- A file named as an input is read if its type is supported (.jsonl .json .ndjson .parquet .txt .text .md
  .csv .tsv),
  also compressed as its name says (``a.jsonl.gz``; .gz .bz2 .xz .zst, see prep/compressed.py; not
  Parquet, which compresses its own pages); a name its first bytes contradict, an archive or other file
  is an error that says what to do.
- A folder saved with ``datasets.save_to_disk`` (it holds ``dataset_info.json``, ``state.json`` or
  ``dataset_dict.json``) is read as a dataset, never as its files, wherever it is met. A DatasetDict with
  several splits needs ``--dataset-split NAME``; one with a single split is read as that split. The split
  read is recorded per input in the manifest.
- Any other folder, given or met, is walked recursively in sorted order, following symbolic links to
  folders. A folder or file reached again (a link loop, two links to one place, an input repeated) is read
  once; the repeat is ignored.
- Within folders and glob matches, these are ignored, each with its reason: hidden files and folders
  (``.git``, ``.pack-work``), documentation (README, license, ``.md``: a folder's notes or a data card;
  name one as an input to pack it), folders written by ``prep pack`` (their ``manifest.json``), archives
  and other compressions, files of other types, broken links and special files. A file met whose name and
  first bytes disagree is an error, as when named.
- An input that is a folder written by ``prep pack``, or that yields no file to read, is an error; so is
  ``--dataset-split`` when no input is a DatasetDict.

The caller prints :func:`describe` and records :attr:`Discovery.ignored` in the manifest, so that every
file read and every file passed over is on record.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prep import hub
from prep.compressed import MAGIC, check_name_and_magic, compression_of, inner_name
from prep.provenance import STDIN, is_stdin
from prep.readers import (
    CSV_SUFFIXES,
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    SUPPORTED,
    TEXT_SUFFIXES,
    InputError,
    InputFile,
)
from prep.urls import expand, is_url
from shared.contract import FORMAT_NAME, MANIFEST_NAME
from shared.manifest import IgnoredInput

DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
COMPRESSED = {
    ".gz": "gunzip -k",
    ".tgz": "tar -xzf",
    ".bz2": "bunzip2 -k",
    ".xz": "unxz -k",
    ".lzma": "unlzma -k",
    ".zst": "unzstd",
    ".zstd": "unzstd",
    ".lz4": "unlz4",
    ".br": "brotli -d",
    ".zip": "unzip",
    ".7z": "7z x",
    ".tar": "tar -xf",
}
"""Compressed suffixes, each with the command that unpacks it (for the hint)."""
DOC_NAMES = frozenset({"readme", "license", "licence", "copying"})
DOC_SUFFIXES = (".md", ".markdown")
SHOWN = 10
"""Files listed by name in :func:`describe` and in errors; the rest are counted."""

HIDDEN = "hidden (its name starts with a dot)"
DOCUMENTATION = (
    "documentation (a README, license or markdown file, or a data card); name it as an input to pack it"
)
PACKED = "a dataset written by `prep pack` (shards, manifest and card), not documents"
BROKEN_LINK = "a broken symbolic link"
SPECIAL = "not a regular file (a pipe, socket or device)"


@dataclass(frozen=True, slots=True)
class Discovery:
    files: tuple[InputFile, ...]
    """What is read, in this order."""
    ignored: tuple[IgnoredInput, ...]
    """What was met among the inputs and not read, in the order met."""


def discover_inputs(inputs: Sequence[str], dataset_split: str | None = None) -> Discovery:
    """The files that ``inputs`` (paths, folders, globs) give under the rule of this module's docstring."""
    walk = _Walk(dataset_split)
    for spec in inputs:
        num_files, num_ignored = len(walk.files), len(walk.ignored)
        path = Path(spec)
        if is_stdin(spec):
            if any(is_stdin(f.path) for f in walk.files):
                raise InputError("input `-` (standard input) is given twice; it can be read only once.")
            walk.files.append(InputFile(Path(STDIN), "jsonl"))
        elif hub.is_hub(spec):
            walk.hub(spec)
        elif is_url(spec):
            walk.urls(spec)
        elif path.exists():
            walk.given(path)
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError(
                    f"input `{spec}` matches no files; check the pattern (quote it in the shell)."
                )
            for match in matches:
                walk.met(Path(match))
        else:
            raise InputError(f"input `{spec}` does not exist; check the path (relative to `{Path.cwd()}`).")
        if len(walk.files) == num_files:
            raise _nothing_to_read(spec, walk.ignored[num_ignored:])
    if dataset_split is not None and not walk.num_dataset_dicts:
        raise InputError(
            f"--dataset-split {dataset_split!r} chooses the split of a saved DatasetDict, and no input is one;"
            " drop the option."
        )
    return Discovery(tuple(walk.files), tuple(walk.ignored))


def describe(found: Discovery) -> str:
    """What a run reads and ignores, for the user: the first :data:`SHOWN` of each, and a count of the rest."""
    names = [f.name + (f" (split {f.dataset_split})" if f.dataset_split else "") for f in found.files]
    lines = [f"reading {_count(len(names), 'input file')}: {', '.join(names[:SHOWN])}{_more(len(names))}"]
    if found.ignored:
        lines.append(f"ignored {_count(len(found.ignored), 'file')} (recorded in manifest.json):")
        lines += [f"  {i.path}: {i.reason}" for i in found.ignored[:SHOWN]]
        if len(found.ignored) > SHOWN:
            lines.append(f"  and {len(found.ignored) - SHOWN:,} more")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _more(n: int) -> str:
    return f", and {n - SHOWN:,} more" if n > SHOWN else ""


def _nothing_to_read(spec: str, ignored: list[IgnoredInput]) -> InputError:
    if not ignored:
        what = f"folder `{spec}` holds" if Path(spec).is_dir() else f"input `{spec}` matches folders holding"
        return InputError(f"{what} no {', '.join(SUPPORTED)} files and no saved dataset.")
    listed = "; ".join(f"`{i.path}` is {i.reason}" for i in ignored[:SHOWN]) + _more(len(ignored))
    return InputError(f"input `{spec}` gives no file to read: {listed}.")


def _format_of(path: Path) -> str | None:
    """The format of ``path``, also when compressed (``a.jsonl.gz`` is JSON lines)."""
    suffix = inner_name(path).suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json" if suffix == ".json" else "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in CSV_SUFFIXES:
        return suffix[1:]
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in DATASET_MARKERS)


def _is_packed_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest of ours (complete or not): `prep pack` output, not documents."""
    try:
        raw = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT_NAME


def _splits_of(dict_file: Path) -> list[str]:
    """The split names a DatasetDict's ``dataset_dict.json`` lists."""
    try:
        splits = json.loads(dict_file.read_text(encoding="utf-8")).get("splits")
    except (OSError, ValueError, AttributeError):
        splits = None
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise InputError(
            f"dataset `{dict_file.parent}`: `{dict_file.name}` does not list its splits. Save the dataset"
            " again with `datasets.save_to_disk`."
        )
    return splits


def _compressed(path: Path) -> str | None:
    """The reason a compressed file is not read, with the command that unpacks it; None if it is read or is
    not compressed."""
    tool = COMPRESSED.get(path.suffix.lower())
    if tool is None:
        return None
    if compression_of(path) is None:
        return f"compressed ({path.suffix}); unpack it to pack it (`{tool} {path}`)"
    inner = inner_name(path).suffix.lower()
    if _format_of(path) not in (None, "parquet"):
        return None
    what = (
        "Parquet compresses its own pages" if inner in PARQUET_SUFFIXES else "a type prep pack does not read"
    )
    return (
        f"compressed ({path.suffix}) {inner or 'no suffix'}, {what}; unpack it to pack it (`{tool} {path}`)"
    )


def _unsupported(path: Path) -> str:
    return f"of a type prep pack does not read ({path.suffix or 'no suffix'})"


class _Walk:
    """The state of one discovery: files found, files ignored, and every real path already reached."""

    def __init__(self, dataset_split: str | None) -> None:
        self.dataset_split = dataset_split
        self.files: list[InputFile] = []
        self.ignored: list[IgnoredInput] = []
        self.reached: dict[str, Path] = {}
        """Real path -> the path it was first reached by: each file and folder is read once."""
        self.num_dataset_dicts = 0

    def given(self, path: Path) -> None:
        """An input that names an existing path: read it, or refuse it."""
        if path.is_dir():
            if _is_packed_dataset(path):
                raise InputError(
                    f"input `{path}` is a dataset written by `prep pack`, not documents; pass the documents it"
                    " was packed from."
                )
            self._folder(path)
        elif reason := _compressed(path):
            raise InputError(f"input `{path}` is {reason}, then pass the unpacked file.")
        elif (fmt := _format_of(path)) is None:
            raise InputError(
                f"input `{path}` has an unsupported type; use {', '.join(SUPPORTED)} (also compressed:"
                f" {' '.join(MAGIC)}), or a folder saved with `datasets.save_to_disk`."
            )
        else:
            self._file(path, fmt)

    def met(self, path: Path) -> None:
        """A path found in a folder or by a glob: read it, or ignore it with the reason."""
        if path.name.startswith("."):
            self._ignore(path, HIDDEN)
        elif path.is_dir():
            if _is_packed_dataset(path):
                self._ignore(path, PACKED)
            else:
                self._folder(path)
        elif not path.is_file():
            self._ignore(path, BROKEN_LINK if path.is_symlink() and not path.exists() else SPECIAL)
        elif reason := _compressed(path):
            self._ignore(path, reason)
        elif (doc := inner_name(path)).stem.lower() in DOC_NAMES or doc.suffix.lower() in DOC_SUFFIXES:
            self._ignore(path, DOCUMENTATION)
        elif (fmt := _format_of(path)) is None:
            self._ignore(path, _unsupported(path))
        else:
            self._file(path, fmt)

    def _ignore(self, path: Path, reason: str) -> None:
        self.ignored.append(IgnoredInput(path=str(path), reason=reason))

    def _first_reach(self, path: Path) -> bool:
        """Record ``path``'s real path; if another path reached it before, ignore this one and say so."""
        real = os.path.realpath(path)
        first = self.reached.setdefault(real, path)
        if first is not path:
            kind = "folder" if path.is_dir() else "file"
            self._ignore(
                path,
                "already read (given twice)"
                if first == path
                else f"the same {kind} as `{first}`, already read",
            )
        return first is path

    def _file(self, path: Path, fmt: str) -> None:
        if fmt != "parquet":
            check_name_and_magic(path)  # before it is reached: a refused file is not on record as read
        if self._first_reach(path):
            self.files.append(InputFile(path, fmt))

    def _folder(self, folder: Path) -> None:
        if not self._first_reach(folder):
            return
        if _is_saved_dataset(folder):
            self.files.append(self._dataset(folder))
            return
        try:
            children = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as e:
            raise InputError(
                f"cannot list folder `{folder}` ({e.strerror or e}). Check its permissions."
            ) from e
        for child in children:
            self.met(child)

    def urls(self, spec: str) -> None:
        """Files named by an fsspec URL or URL glob (prep/urls.py), each read under the rule for files."""
        for url in expand(spec):
            fmt = _format_of(Path(url))
            if fmt is None or (reason := _compressed(Path(url))):
                what = "an unsupported type" if fmt is None else reason
                raise InputError(
                    f"input `{url}` is {what}; a URL names a {', '.join(SUPPORTED)} file (also compressed:"
                    f" {' '.join(MAGIC)}). Saved datasets are read from local folders."
                )
            if fmt != "parquet":
                check_name_and_magic(url)
            if self._first_reach(Path(url)):
                self.files.append(InputFile(Path(url), fmt, url=url))

    def hub(self, spec: str) -> None:
        """A Hugging Face dataset by name (prep/hub.py); the split to read under the DatasetDict rule."""
        name = hub.hub_name(spec)
        self.num_dataset_dicts += 1
        splits = hub.splits(name)
        if self.dataset_split is None and len(splits) > 1:
            raise InputError(
                f"dataset `{spec}` has splits {', '.join(splits)}; choose the one to pack with"
                " `--dataset-split NAME`."
            )
        split = self.dataset_split or splits[0]
        hub.split(name, split)  # refuses a split it does not have
        if self._first_reach(Path(spec)):
            self.files.append(InputFile(Path(spec), hub.FORMAT, dataset_split=split))

    def _dataset(self, folder: Path) -> InputFile:
        """A saved dataset; for a DatasetDict, the split to read under the rule."""
        dict_file = folder / "dataset_dict.json"
        if not dict_file.is_file():
            return InputFile(folder, "arrow-dataset")
        self.num_dataset_dicts += 1
        splits = _splits_of(dict_file)
        if self.dataset_split is None and len(splits) > 1:
            raise InputError(
                f"dataset `{folder}` is a DatasetDict with splits {', '.join(splits)}; choose the one to pack"
                f" with `--dataset-split NAME`, or pass split folders as inputs (e.g. `{folder / splits[0]}`)."
            )
        split = self.dataset_split or splits[0]
        if split not in splits:
            raise InputError(
                f"dataset `{folder}` has no split `{split}` (its splits: {', '.join(splits)}); choose one of"
                " them with `--dataset-split`, or pass split folders as inputs."
            )
        return InputFile(folder, "arrow-dataset", dataset_split=split)
