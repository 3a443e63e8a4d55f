"""The manifest: what a packed dataset folder holds, how it was made, and where every input document went.

`manifest.json` is written last, after every shard is synced, so its presence with ``complete: true``
is what makes a folder a dataset. Every input document is accounted for:
``docs_in == packed + dropped + skipped``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.contract import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME
from shared.errors import IncompleteDatasetError, ManifestError
from shared.fileio import atomic_write_text


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizerInfo:
    path: str
    """The tokenizer as given to `prep pack` (a `tokenizer.json` or a folder holding one)."""
    sha256: str
    """Fingerprint: sha256 of the `tokenizer.json` bytes."""
    vocab_size: int
    eos_token: str
    eos_id: int
    bos_token: str | None = None
    bos_id: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PackOptions:
    seq_len: int
    strategy: str
    text_field: str
    long_docs: str
    val_fraction: float
    skip_invalid: bool = False
    dataset_split: str | None = None
    """``--dataset-split``: the split read from each saved DatasetDict input (None when not given)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class InputInfo:
    path: str
    format: str
    first_doc_id: int
    """`doc_id` of this file's first record: doc ids count records across all inputs, in input order."""
    num_records: int
    dataset_split: str | None = None
    """The split read, when the input is a saved DatasetDict."""


@dataclass(frozen=True, kw_only=True, slots=True)
class IgnoredInput:
    """A file or folder that input discovery met and did not read (prep/discovery.py), and why."""

    path: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentAccounting:
    """Where every input record went. ``split`` and ``truncated`` are subsets of ``packed``."""

    docs_in: int = 0
    packed: int = 0
    split: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped_empty: int = 0
    skipped_missing_field: int = 0
    skipped_invalid: int = 0
    tokens_in: int = 0
    """Tokens of the packed and dropped documents, EOS/BOS included, before truncation or dropping."""
    tokens_packed: int = 0
    tokens_truncated: int = 0
    """Tokens cut off by ``--long-docs truncate``."""
    tokens_dropped: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_empty + self.skipped_missing_field + self.skipped_invalid

    def problems(self) -> list[str]:
        """Ways in which the counts fail to add up; empty when every document and token is accounted for."""
        found = []
        if self.docs_in != self.packed + self.dropped + self.skipped:
            found.append(
                f"docs_in {self.docs_in:,} != packed {self.packed:,} + dropped {self.dropped:,}"
                f" + skipped {self.skipped:,}"
            )
        if self.tokens_in != self.tokens_packed + self.tokens_truncated + self.tokens_dropped:
            found.append(
                f"tokens_in {self.tokens_in:,} != packed {self.tokens_packed:,}"
                f" + truncated {self.tokens_truncated:,} + dropped {self.tokens_dropped:,}"
            )
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardInfo:
    file: str
    num_rows: int
    num_tokens: int
    num_segments: int
    num_docs: int
    """Documents that end (carry their EOS) in this shard."""
    num_bytes: int
    sha256: str


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitInfo:
    num_rows: int
    num_tokens: int
    num_target_tokens: int
    num_segments: int
    num_docs: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    tokenizer: TokenizerInfo
    options: PackOptions
    inputs: tuple[InputInfo, ...]
    documents: DocumentAccounting
    splits: dict[str, SplitInfo]
    created_by: str
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    complete: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts for humans (timings, engine); never read by the tools."""
    ignored: tuple[IgnoredInput, ...] = ()
    """Files and folders met among the inputs but not read, each with its reason."""

    @property
    def seq_len(self) -> int:
        return self.options.seq_len

    def to_json(self) -> str:
        raw = asdict(self)
        # Fields added after version 1 are written only when they say something, so that a pack that
        # ignores nothing and reads no DatasetDict keeps the manifest bytes it always had.
        if not raw["ignored"]:
            del raw["ignored"]
        if raw["options"]["dataset_split"] is None:
            del raw["options"]["dataset_split"]
        for info in raw["inputs"]:
            if info["dataset_split"] is None:
                del info["dataset_split"]
        return json.dumps(raw, indent=2, sort_keys=False) + "\n"

    def save(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST_NAME, self.to_json())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        try:
            splits = {
                name: SplitInfo(**{**s, "shards": tuple(ShardInfo(**sh) for sh in s["shards"])})
                for name, s in raw["splits"].items()
            }
            return cls(
                tokenizer=TokenizerInfo(**raw["tokenizer"]),
                options=PackOptions(**raw["options"]),
                inputs=tuple(InputInfo(**i) for i in raw["inputs"]),
                documents=DocumentAccounting(**raw["documents"]),
                splits=splits,
                created_by=raw["created_by"],
                format=raw["format"],
                format_version=raw["format_version"],
                complete=raw["complete"],
                extra=raw.get("extra", {}),
                ignored=tuple(IgnoredInput(**i) for i in raw.get("ignored", ())),
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(
                f"manifest is malformed ({type(e).__name__}: {e}); re-run `prep pack`."
            ) from e

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(f"`{folder}` is not a folder; pass the folder that `prep pack --out` wrote.")
        if not path.exists():
            raise IncompleteDatasetError(
                f"`{folder}` has no {MANIFEST_NAME}: it is not a packed dataset, or packing was interrupted."
                f" Run `prep pack ... --out {folder} --resume` to finish it."
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"`{path}` is not valid JSON ({e}); re-run `prep pack`.") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise ManifestError(f"`{path}` is not a {FORMAT_NAME} manifest.")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"`{path}` has format_version {raw.get('format_version')!r}; this tool reads version"
                f" {FORMAT_VERSION}. Re-pack the data with this version of `prep pack`."
            )
        if raw.get("complete") is not True:
            raise IncompleteDatasetError(
                f"`{path}` says the dataset is incomplete; run `prep pack ... --resume` to finish it."
            )
        return cls.from_dict(raw)
