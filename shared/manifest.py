"""The manifest: what a packed dataset folder holds, how it was made, and where every input document went.

`manifest.json` is written last, after every shard is synced, so its presence with ``complete: true``
is what makes a folder a dataset. Every input document is accounted for:
``docs_in == packed + dropped + skipped``.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.contract import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SHARD_SUFFIX
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
    format: str | None = None
    """What the records held when not plain text: ``chat``, ``prompt-completion`` or ``mixed`` (inputs of
    both or of text too). Its labels then follow a target mask: ``-100`` wherever nothing is learnt."""
    train_on: str | None = None
    """``--train-on``: the roles whose turns are targets, comma-separated (conversations only)."""
    long_chats: str | None = None
    """``--long-chats``: ``drop`` or ``truncate``, for conversations and pairs longer than a row."""
    chat_template: str | None = None
    """Where the chat template came from (a file path), when conversations were rendered."""

    @property
    def masked_labels(self) -> bool:
        """Whether labels follow a target mask (conversations, pairs) rather than every token but the first."""
        return self.format is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class InputInfo:
    path: str
    format: str
    first_doc_id: int
    """`doc_id` of this file's first record: doc ids count records across all inputs, in input order."""
    num_records: int
    dataset_split: str | None = None
    """The split read, when the input is a saved DatasetDict."""
    source: str | None = None
    """The mixture source the file belongs to (`prep pack --recipe`/`--source`); None for a plain pack."""
    num_docs: int | None = None
    """Documents of the file that reading and ``--long-docs`` kept (records less skipped and dropped ones);
    None in manifests written before it was recorded."""
    num_tokens: int | None = None
    """Their tokens, EOS/BOS included, after ``--long-docs`` (before a mixture samples them)."""
    num_bytes: int | None = None
    """Provenance (prep/provenance.py), taken while the input was read: its size in bytes on disk (a saved
    dataset: its Arrow files'; standard input: the bytes read). None in manifests written before."""
    mtime_ns: int | None = None
    """Its modification time, ns since the epoch (a saved dataset: its newest Arrow file; None for stdin)."""
    sha256: str | None = None
    """sha256 of its bytes on disk (compressed as stored; a saved dataset's Arrow files in sorted order)."""
    record_format: str | None = None
    """``chat`` or ``prompt-completion`` when the file's records held those (None: text)."""


INPUT_OPTIONAL = (
    "dataset_split",
    "record_format",
    "source",
    "num_docs",
    "num_tokens",
    "num_bytes",
    "mtime_ns",
    "sha256",
)
"""Fields of :class:`InputInfo` written only when known."""


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
class MixSourceInfo:
    """One source of a mixture (`prep pack --recipe`): what was asked, and where its documents went.

    ``docs_in == docs_packed + docs_left_out`` and the same for tokens; repeats are extra copies of packed
    documents, so the tokens stored of the source are ``tokens_packed + tokens_repeated``
    ``== train_tokens + val_tokens``. "In" counts the source's documents that reading and ``--long-docs``
    kept (``documents.packed`` summed over the sources).
    """

    name: str
    inputs: tuple[str, ...]
    text_field: str
    share: float | None = None
    """Requested share of the packed ``train`` tokens (None: the source gives ``epochs``)."""
    epochs: float | None = None
    docs_in: int
    tokens_in: int
    docs_packed: int
    """Distinct documents stored (first copies), in either split."""
    tokens_packed: int
    docs_repeated: int
    """Further copies of packed documents (``train`` only)."""
    tokens_repeated: int
    docs_left_out: int
    tokens_left_out: int
    train_tokens: int
    val_tokens: int
    achieved_share: float
    """``train_tokens`` over the ``train`` split's tokens."""

    def problems(self) -> list[str]:
        """Ways in which this source's counts fail to add up."""
        found = []
        if self.docs_in != self.docs_packed + self.docs_left_out:
            found.append(
                f"source `{self.name}`: docs_in {self.docs_in:,} != packed {self.docs_packed:,}"
                f" + left out {self.docs_left_out:,}"
            )
        if self.tokens_in != self.tokens_packed + self.tokens_left_out:
            found.append(
                f"source `{self.name}`: tokens_in {self.tokens_in:,} != packed {self.tokens_packed:,}"
                f" + left out {self.tokens_left_out:,}"
            )
        if self.tokens_packed + self.tokens_repeated != self.train_tokens + self.val_tokens:
            found.append(
                f"source `{self.name}`: packed {self.tokens_packed:,} + repeated {self.tokens_repeated:,}"
                f" tokens != train {self.train_tokens:,} + val {self.val_tokens:,}"
            )
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class MixtureInfo:
    """The recipe a dataset was mixed by and what each source gave (written only for a mixture)."""

    seed: int
    max_epochs: float
    total_tokens: int | None = None
    sources: tuple[MixSourceInfo, ...] = ()


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
class CardInfo:
    """What the data card says about the data beyond the packing (`prep pack --license ...`), under the
    Hugging Face dataset-card keys; each written only when given."""

    license: str | None = None
    """An SPDX-style license id (`apache-2.0`, `cc-by-4.0`) or `other`."""
    language: tuple[str, ...] = ()
    """ISO 639-1 or 639-3 codes (`en`, `yue`)."""
    source_datasets: tuple[str, ...] = ()
    """The datasets the documents come from, by name."""
    description: str | None = None
    """Free text, the card's description section."""


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
    card: CardInfo | None = None
    """License, languages, source datasets and description, when `prep pack` was given any."""
    mixture: MixtureInfo | None = None
    """The mixture of `prep pack --recipe`/`--source`, per source; None for a plain pack."""

    @property
    def seq_len(self) -> int:
        return self.options.seq_len

    def to_json(self) -> str:
        raw = asdict(self)
        # Fields added after version 1 are written only when they say something, so that a pack that
        # ignores nothing and reads no DatasetDict keeps the manifest bytes it always had.
        if not raw["ignored"]:
            del raw["ignored"]
        if raw["mixture"] is None:
            del raw["mixture"]
        if raw["card"] is None:
            del raw["card"]
        else:
            raw["card"] = {k: v for k, v in raw["card"].items() if v not in (None, ())}
        for key in ("dataset_split", "format", "train_on", "long_chats", "chat_template"):
            if raw["options"][key] is None:
                del raw["options"][key]
        for info in raw["inputs"]:
            for key in INPUT_OPTIONAL:
                if info[key] is None:
                    del info[key]
        return json.dumps(raw, indent=2, sort_keys=False) + "\n"

    def save(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST_NAME, self.to_json())

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "manifest") -> Manifest:
        """The manifest in ``raw``, every field checked against its declared type and range first.

        ``source`` names the file in messages. A field of the wrong type, a count below zero, an EOS beyond
        the vocabulary or a shard path leading out of the folder is a :class:`ManifestError` naming it.
        """
        check = _FieldCheck(source)
        top = check.fields(cls, raw, "")
        splits = {
            name: SplitInfo(
                **{
                    **check.fields(SplitInfo, s, f"splits.{name}."),
                    "shards": tuple(
                        ShardInfo(**check.fields(ShardInfo, sh, f"splits.{name}.shards[{k}]."))
                        for k, sh in enumerate(check.items(s["shards"], f"splits.{name}.shards"))
                    ),
                }
            )
            for name, s in check.mapping(top["splits"], "splits").items()
        }
        manifest = cls(
            **{
                **top,
                "tokenizer": TokenizerInfo(**check.fields(TokenizerInfo, top["tokenizer"], "tokenizer.")),
                "options": PackOptions(**check.fields(PackOptions, top["options"], "options.")),
                "inputs": tuple(
                    InputInfo(**check.fields(InputInfo, i, f"inputs[{k}]."))
                    for k, i in enumerate(check.items(top["inputs"], "inputs"))
                ),
                "documents": DocumentAccounting(
                    **check.fields(DocumentAccounting, top["documents"], "documents.")
                ),
                "splits": splits,
                "ignored": tuple(
                    IgnoredInput(**check.fields(IgnoredInput, i, f"ignored[{k}]."))
                    for k, i in enumerate(check.items(top.get("ignored", []), "ignored"))
                ),
                "card": None if top.get("card") is None else check.card(top["card"]),
                "mixture": _mixture(check, top.get("mixture")),
            }
        )
        check.ranges(manifest)
        return manifest

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
        return cls.from_dict(raw, str(path))


def _mixture(check: _FieldCheck, raw: object) -> MixtureInfo | None:
    if raw is None:
        return None
    top = check.fields(MixtureInfo, raw, "mixture.")
    sources = []
    for k, item in enumerate(check.items(top.get("sources", []), "mixture.sources")):
        prefix = f"mixture.sources[{k}]."
        values = check.fields(MixSourceInfo, item, prefix)
        inputs = check.items(values["inputs"], prefix + "inputs")
        if not all(isinstance(i, str) for i in inputs):
            raise check.fail(prefix + "inputs", "holds a value that is not a string")
        sources.append(MixSourceInfo(**{**values, "inputs": tuple(inputs)}))
    return MixtureInfo(**{**top, "sources": tuple(sources)})


MAX_INT32 = 2**31 - 1
"""Token ids, positions and `cu_seqlens` are int32: no id, row length or `seq_len` may exceed this."""


class _FieldCheck:
    """Checks a manifest's fields one by one, so that an edited or damaged field is named in the error."""

    _KINDS = {"int": int, "str": str, "float": (int, float), "bool": bool}

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field_name: str, problem: str) -> ManifestError:
        return ManifestError(
            f"`{self.source}`: field `{field_name}` {problem}. The manifest was edited or damaged after"
            " packing; restore it, or re-run `prep pack`."
        )

    def mapping(self, value: object, name: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(name, f"is {_json(value)}, expected an object")
        return value

    def items(self, value: object, name: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(name, f"is {_json(value)}, expected a list")
        return value

    def card(self, raw: object) -> CardInfo:
        """The ``card`` record: its scalars as :meth:`fields` checks them, its lists of strings here."""
        values = self.fields(CardInfo, raw, "card.")
        for key in ("language", "source_datasets"):
            if key in values:
                items = self.items(values[key], f"card.{key}")
                if not all(isinstance(v, str) for v in items):
                    raise self.fail(f"card.{key}", f"is {_json(items)}, expected a list of strings")
                values[key] = tuple(items)
        return CardInfo(**values)

    def fields(self, cls: type, raw: object, prefix: str) -> dict[str, Any]:
        """``raw``'s values for the fields of dataclass ``cls``: each scalar of its declared type, none unknown."""
        raw = self.mapping(raw, prefix.rstrip(".") or "(top level)")
        if unknown := sorted(set(raw) - {f.name for f in fields(cls)}):
            raise self.fail(prefix + unknown[0], "is not a field of this format")
        values = {}
        for f in fields(cls):
            name = prefix + f.name
            if f.name not in raw:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise self.fail(name, "is missing")
                continue
            value = values[f.name] = raw[f.name]
            kinds = str(f.type).split(" | ")
            if value is None and "None" in kinds:
                continue
            kind = self._KINDS.get(kinds[0])
            if kind is None:  # a nested record, checked by the caller
                continue
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise self.fail(
                    name, f"is {_json(value)}, expected {'a' if kinds[0] != 'int' else 'an'} {kinds[0]}"
                )
            if kind is int and isinstance(value, int) and value < 0:  # isinstance: for the type checker
                raise self.fail(name, f"is {value}, a count or id below zero")
        return values

    def ranges(self, m: Manifest) -> None:
        """What the format allows beyond the types: int32 ids and rows, ids inside the vocabulary, plain shard names."""
        t = m.tokenizer
        if not 1 <= t.vocab_size <= MAX_INT32 + 1:
            raise self.fail(
                "tokenizer.vocab_size", f"is {t.vocab_size:,}, outside 1..{MAX_INT32 + 1:,} (ids are int32)"
            )
        for key, token_id in (("eos_id", t.eos_id), ("bos_id", t.bos_id)):
            if token_id is not None and token_id >= t.vocab_size:
                raise self.fail(
                    f"tokenizer.{key}", f"is {token_id:,}, not below `tokenizer.vocab_size` {t.vocab_size:,}"
                )
        if not 2 <= m.seq_len <= MAX_INT32:
            raise self.fail("options.seq_len", f"is {m.seq_len:,}, outside 2..{MAX_INT32:,}")
        for split, info in m.splits.items():
            for k, shard in enumerate(info.shards):
                if problem := shard_name_problem(shard.file):
                    raise self.fail(f"splits.{split}.shards[{k}].file", f"is {_json(shard.file)}: {problem}")


def shard_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a shard's file name, or None: a shard is a plain `.arrow` file inside the folder.

    The reader joins it to the dataset folder; a separator, `..` or an absolute path would open a file
    elsewhere, which no check of the folder would then cover.
    """
    if "/" in name or "\\" in name or "\0" in name:
        return "a shard is a file name inside the dataset folder, without a path"
    if name in ("", ".", "..") or not name.endswith(SHARD_SUFFIX) or name.startswith("."):
        return f"a shard is a visible `*{SHARD_SUFFIX}` file inside the dataset folder"
    return None


def _json(value: object) -> str:
    """``value`` as it reads in the JSON file, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
