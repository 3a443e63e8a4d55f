"""Mixtures: a recipe of named sources, each packed to a share of the tokens or a number of epochs.

A recipe (TOML, or ``--source`` on the command line) names sources, each with its inputs and text field
and either ``share`` (of the packed ``train`` tokens) or ``epochs``; ``max_epochs`` caps the repetition of
any source, ``total_tokens`` optionally fixes the size, ``seed`` the sample. docs/mixtures.md has the rules.

Selection is by whole documents and happens in the plan stage, from the per-document arrays of pass 1
(length, val flag, content hash, and the input file each document came from), so it is a pure function
of them: resumed and Ray runs select the same documents. For a source whose quota is ``q`` tokens and
whose ``train`` documents hold ``T``::

    copies  k = floor(q / T)        every document k times (copy 0 is the document, 1.. repeats)
    rest    r = q - k * T           documents in the order of a seeded hash of their text, taken while
                                    that brings the tokens closer to r; they get copy number k

Documents that no copy takes are left out. A copy ``c > 0`` of the record with doc id ``i`` is stored
under doc id ``i + c * docs_in``, so every stored document keeps a distinct id and ``doc_id % docs_in``
is always the input record. The ``val`` split is chosen by the content hash before any of this, and is
mixed to the shares that ``train`` achieved, without repetition, as large as its documents allow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from shared.errors import UserError
from shared.manifest import MixSourceInfo, MixtureInfo

SHARE_TOLERANCE = 1e-6
"""How far the shares may sum from 1 (they are typed by hand: 0.3 + 0.3 + 0.4 is not exactly 1.0)."""
SOURCE_KEYS = ("inputs", "text_field", "share", "epochs")
TOP_KEYS = ("sources", "seed", "max_epochs", "total_tokens")
# The data card's metadata (license, language, source_datasets, description) will be read from a `[card]`
# table of the recipe once `prep pack` takes it as flags; until then `card` is an unknown key like any other.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecipeError(UserError):
    """A recipe that cannot be used as written; the message names the key and the fix."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MixSource:
    name: str
    inputs: tuple[str, ...]
    """Files, folders or globs, read in the order given."""
    text_field: str | None = None
    """None: `--text-field` (default ``text``)."""
    share: float | None = None
    """Target share of the packed ``train`` tokens, in (0, 1]."""
    epochs: float | None = None
    """Times each document is packed (a fraction takes a hashed subset), instead of a share."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Mixture:
    sources: tuple[MixSource, ...]
    seed: int = 0
    """Seeds the hash order in which a fraction of a source's documents is taken."""
    max_epochs: float = 1.0
    """No source is packed more often than this; 1: no document is repeated."""
    total_tokens: int | None = None
    """Packed ``train`` tokens to aim at; default the most that ``max_epochs`` allows."""
    where: str = "recipe"
    """The recipe file, or ``--source``, for messages."""

    def __post_init__(self) -> None:
        check_mixture(self)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(i for s in self.sources for i in s.inputs)

    def fingerprint(self) -> dict[str, Any]:
        """What shapes the output, for `--resume`: ``mixture`` shapes the tokenized work, ``mixture_plan`` only
        the plan (a run stopped by a share its cap cannot meet resumes with the recipe fixed)."""
        return {
            "mixture": [
                {"name": s.name, "inputs": list(s.inputs), "text_field": s.text_field} for s in self.sources
            ],
            "mixture_plan": {
                "shares": [s.share for s in self.sources],
                "epochs": [s.epochs for s in self.sources],
                "seed": self.seed,
                "max_epochs": self.max_epochs,
                "total_tokens": self.total_tokens,
            },
        }


# --- reading a recipe -------------------------------------------------------------------------------------


def load_recipe(path: str | Path) -> Mixture:
    """The mixture of the TOML recipe at ``path``, checked key by key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"--recipe `{path}` cannot be read ({e.strerror}); pass a TOML file.") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"--recipe `{path}` is not valid TOML ({e}); fix the file.") from e
    return mixture_from_dict(raw, where=f"recipe `{path}`")


def mixture_from_dict(raw: dict[str, Any], where: str = "recipe") -> Mixture:
    """A :class:`Mixture` from a parsed recipe; an unknown key or a value of the wrong type is named."""
    _refuse_unknown(raw, TOP_KEYS, where, "")
    tables = raw.get("sources")
    if not isinstance(tables, dict) or not tables:
        raise RecipeError(
            f"{where}: no sources; add one table per source, e.g. `[sources.news]` with"
            ' `inputs = ["data/news/*.jsonl"]` and `share = 0.3`.'
        )
    sources = []
    for name, table in tables.items():
        key = f"sources.{name}"
        if not isinstance(table, dict):
            raise RecipeError(f"{where}: `{key}` is {_kind(table)}; make it a table (`[{key}]`).")
        _refuse_unknown(table, SOURCE_KEYS, where, key + ".")
        inputs = table.get("inputs")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise RecipeError(
                f"{where}: `{key}.inputs` is {_kind(inputs)}; give a list of files, folders or globs,"
                ' e.g. `inputs = ["data/news/*.jsonl"]`.'
            )
        sources.append(
            MixSource(
                name=name,
                inputs=tuple(inputs),
                text_field=_typed(table, "text_field", str, where, key),
                share=_number(table, "share", where, key),
                epochs=_number(table, "epochs", where, key),
            )
        )
    total = _typed(raw, "total_tokens", int, where, "")
    return Mixture(
        sources=tuple(sources),
        seed=_typed(raw, "seed", int, where, "") or 0,
        max_epochs=_number(raw, "max_epochs", where, "") or 1.0,
        total_tokens=total,
        where=where,
    )


def parse_source_option(spec: str) -> MixSource:
    """One ``--source NAME=INPUT[,INPUT...][:share=X|:epochs=X][:text_field=F]`` as a :class:`MixSource`.

    Options are the trailing ``:key=value`` parts, so a path or URL holding a colon (``s3://b/x``) stays
    whole.
    """
    example = "e.g. --source 'news=data/news/*.jsonl:share=0.3'"
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise RecipeError(f"--source {spec!r}: expected NAME=INPUTS[:share=X], {example}.")
    parts = rest.split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and re.fullmatch(r"[a-z_]+=.*", parts[-1]):
        key, _, value = parts.pop().partition("=")
        if key in options:
            raise RecipeError(f"--source {spec!r}: `{key}` is given twice; keep one.")
        options[key] = value
    if unknown := sorted(set(options) - {"share", "epochs", "text_field"}):
        raise RecipeError(
            f"--source {spec!r}: unknown key `{unknown[0]}`; the keys are share, epochs and text_field ({example})."
        )
    inputs = tuple(i for i in ":".join(parts).split(",") if i)
    if not inputs:
        raise RecipeError(f"--source {spec!r}: no inputs after `{name}=`; {example}.")
    return MixSource(
        name=name,
        inputs=inputs,
        text_field=options.get("text_field"),
        share=_float_option(spec, options, "share"),
        epochs=_float_option(spec, options, "epochs"),
    )


def mixture_from_options(
    specs: Sequence[str], *, seed: int | None, max_epochs: float | None, total_tokens: int | None
) -> Mixture:
    """The mixture of repeated ``--source`` options and the ``--mix-seed``/``--max-epochs``/``--total-tokens`` flags."""
    return Mixture(
        sources=tuple(parse_source_option(s) for s in specs),
        seed=0 if seed is None else seed,
        max_epochs=1.0 if max_epochs is None else max_epochs,
        total_tokens=total_tokens,
        where="--source",
    )


def _refuse_unknown(table: dict[str, Any], known: tuple[str, ...], where: str, prefix: str) -> None:
    if unknown := [k for k in table if k not in known]:
        raise RecipeError(
            f"{where}: unknown key `{prefix}{unknown[0]}`; the keys here are {', '.join(known)}."
        )


def _typed(table: dict[str, Any], key: str, kind: type, where: str, prefix: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        name = f"{prefix}.{key}" if prefix else key
        raise RecipeError(f"{where}: `{name}` is {_kind(value)}; expected {kind.__name__}.")
    return value


def _number(table: dict[str, Any], key: str, where: str, prefix: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        name = f"{prefix}.{key}" if prefix else key
        raise RecipeError(f"{where}: `{name}` is {_kind(value)}; expected a number.")
    return float(value)


def _float_option(spec: str, options: dict[str, str], key: str) -> float | None:
    if key not in options:
        return None
    try:
        return float(options[key])
    except ValueError:
        raise RecipeError(f"--source {spec!r}: `{key}={options[key]}` is not a number.") from None


def _kind(value: object) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list"}.get(
        type(value),
        "a table" if isinstance(value, dict) else "missing" if value is None else type(value).__name__,
    )


def check_mixture(m: Mixture) -> None:
    """The rules of docs/mixtures.md that need no data: each message names the key and the fix."""
    names = [s.name for s in m.sources]
    if not m.sources:
        raise RecipeError(f"{m.where}: no sources; name at least one.")
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise RecipeError(f"{m.where}: source `{dup}` is named twice; give each source its own name.")
    for s in m.sources:
        _check_source(m, s)
    if not m.max_epochs >= 1.0 or not math.isfinite(m.max_epochs):
        raise RecipeError(
            f"{m.where}: `max_epochs` is {m.max_epochs}; it must be at least 1 (1: no repetition)."
        )
    if m.total_tokens is not None and m.total_tokens < 1:
        raise RecipeError(f"{m.where}: `total_tokens` is {m.total_tokens}; it must be at least 1.")
    shares = [s.share for s in m.sources if s.share is not None]
    with_epochs = [s.name for s in m.sources if s.epochs is not None]
    if m.total_tokens is not None and with_epochs:
        raise RecipeError(
            f"{m.where}: `total_tokens` with source `{with_epochs[0]}` in epochs over-determines the mixture"
            " (its epochs fix its tokens); give every source a share, or drop `total_tokens`."
        )
    total = math.fsum(shares)
    if not with_epochs and abs(total - 1.0) > SHARE_TOLERANCE:
        scaled = ", ".join(f"{s.name}={s.share / total:.4g}" for s in m.sources if s.share is not None)
        raise RecipeError(
            f"{m.where}: the shares sum to {total:.6g}, not 1; scale them to sum to 1 (e.g. {scaled})."
        )
    if with_epochs and shares and total >= 1.0 - SHARE_TOLERANCE:
        raise RecipeError(
            f"{m.where}: the shares sum to {total:.6g} beside sources in epochs ({', '.join(with_epochs)}),"
            " which take the rest; the shares must sum to below 1."
        )


def _check_source(m: Mixture, s: MixSource) -> None:
    key = f"sources.{s.name}"
    if not NAME_PATTERN.match(s.name):
        raise RecipeError(f"{m.where}: source name {s.name!r}: use letters, digits, `_`, `.` and `-`.")
    if not s.inputs:
        raise RecipeError(f"{m.where}: `{key}.inputs` is empty; give at least one file, folder or glob.")
    if s.share is not None and s.epochs is not None:
        raise RecipeError(f"{m.where}: `{key}` gives both `share` and `epochs`; keep one.")
    if s.share is None and s.epochs is None:
        raise RecipeError(f"{m.where}: `{key}` needs `share` (of the packed tokens) or `epochs`; add one.")
    if s.share is not None and not 0.0 < s.share <= 1.0:
        raise RecipeError(f"{m.where}: `{key}.share` is {s.share}; a share is in (0, 1].")
    if s.epochs is not None and not 0.0 < s.epochs <= m.max_epochs:
        raise RecipeError(
            f"{m.where}: `{key}.epochs` is {s.epochs}; epochs are above 0 and at most `max_epochs`"
            f" ({m.max_epochs:g}): raise `max_epochs` to {s.epochs:g}, or lower the epochs."
        )
    if s.text_field is not None and not s.text_field.strip():
        raise RecipeError(f"{m.where}: `{key}.text_field` is empty; name the field, or drop the key.")


# --- selecting documents ----------------------------------------------------------------------------------


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (wrapping): a seeded, order-free key per document."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK


def sample_keys(doc_hash: np.ndarray, seed: int) -> np.ndarray:
    """Each document's place in the order a fraction is taken in: its content hash mixed with the seed."""
    salt = mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    return mix64(doc_hash.astype(np.uint64) ^ salt)


@dataclass(frozen=True, slots=True)
class Taken:
    """What one source gives one split: ``docs`` (indices among all documents) each with its copy number."""

    docs: np.ndarray
    copy: np.ndarray

    @staticmethod
    def empty() -> Taken:
        return Taken(np.zeros(0, np.int64), np.zeros(0, np.int64))


def take(
    docs: np.ndarray,
    lengths: np.ndarray,
    keys: np.ndarray,
    quota: float,
    max_copies: int | None,
    max_epochs: float | None = None,
) -> Taken:
    """Whole copies of ``docs`` and then a hashed subset, so that their tokens come closest to ``quota``.

    ``max_copies``: at most this many copies (None: no limit), for the ``val`` split's single one.
    ``max_epochs``: the tokens never pass this many times those of ``docs`` (the last document is then
    left out rather than rounded up to).
    """
    total = int(lengths.sum())
    if total == 0 or quota <= 0:
        return Taken.empty()
    if max_epochs is not None:
        quota = min(quota, max_epochs * total)
    copies = int(quota // total)
    if max_copies is not None and copies >= max_copies:
        copies, rest = max_copies, 0.0
    else:
        rest = quota - copies * total
    order = np.argsort(keys, kind="stable")
    picked = order[:0] if rest <= 0 else _fill(lengths, order, rest)
    if (
        max_epochs is not None
        and picked.size
        and copies * total + int(lengths[picked].sum()) > max_epochs * total
    ):
        picked = picked[:-1]  # the one document rounded up to would pass the cap
    parts = [docs] * copies + [np.sort(docs[picked])]
    copy = [np.full(len(p), c, np.int64) for c, p in enumerate(parts)]
    return Taken(np.concatenate(parts).astype(np.int64), np.concatenate(copy))


FILL_STEPS = 64
"""Documents taken past the first that overshoots, at most (each one a pass over the rest)."""


def _fill(lengths: np.ndarray, order: np.ndarray, rest: float) -> np.ndarray:
    """Indices (into ``lengths``) of the documents taken for ``rest`` tokens, in hash order.

    The prefix of the hash order that fits, then each later document that still fits (a long document
    at the boundary would otherwise cost up to its length), then the next one if that comes closer.
    """
    cum = np.cumsum(lengths[order])
    m = int(np.searchsorted(cum, rest, side="right"))  # cum[m - 1] <= rest < cum[m]
    taken = [order[:m]]
    room = rest - (cum[m - 1] if m else 0)
    later = order[m:]
    for _ in range(FILL_STEPS):
        fits = np.flatnonzero(lengths[later] <= room)
        if not fits.size:
            break
        taken.append(later[fits[:1]])
        room -= lengths[later[fits[0]]]
        later = later[fits[0] + 1 :]
    if later.size and lengths[later[0]] - room < room:  # rounding up comes closer than stopping short
        taken.append(later[:1])
    return np.concatenate(taken)


@dataclass(frozen=True, slots=True)
class SourceDocs:
    """The documents of one source in one split, as the plan stage sees them."""

    docs: np.ndarray
    lengths: np.ndarray
    keys: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def train_quotas(m: Mixture, train: list[SourceDocs]) -> list[float]:
    """Each source's ``train`` token quota; a share the cap cannot meet is an error giving what it can."""
    fixed = math.fsum(
        s.epochs * d.tokens for s, d in zip(m.sources, train, strict=True) if s.epochs is not None
    )
    shares = math.fsum(s.share for s in m.sources if s.share is not None)
    for s, d in zip(m.sources, train, strict=True):
        if d.tokens == 0:
            raise RecipeError(
                f"{m.where}: source `{s.name}` has no documents to pack in `train` (its inputs hold no text,"
                " or every document went to `val`); check its inputs and text field, or remove it."
            )
    if shares == 0.0:
        total = fixed
    elif fixed > 0.0:
        total = fixed / (1.0 - shares)
    else:
        total = (
            float(m.total_tokens)
            if m.total_tokens is not None
            else min(
                m.max_epochs * d.tokens / s.share
                for s, d in zip(m.sources, train, strict=True)
                if s.share is not None
            )
        )
    quotas = []
    for s, d in zip(m.sources, train, strict=True):
        quota = s.epochs * d.tokens if s.epochs is not None else s.share * total
        if quota > m.max_epochs * d.tokens * (1 + 1e-12):
            most = m.max_epochs * d.tokens
            raise RecipeError(
                f"{m.where}: source `{s.name}` would need {quota / d.tokens:.3g} epochs of its {d.tokens:,}"
                f" train tokens for share {s.share:g} of {total:,.0f} tokens, above `max_epochs` {m.max_epochs:g}."
                f" Raise `max_epochs` to {math.ceil(quota / d.tokens * 100) / 100:g}, or give it a share of at most"
                f" {most / total:.4g}"
                + (f", or lower `total_tokens` to {_most(m, train):,}." if m.total_tokens else ".")
            )
        quotas.append(quota)
    return quotas


def _most(m: Mixture, train: list[SourceDocs]) -> int:
    """The largest ``total_tokens`` that ``max_epochs`` allows for shares alone."""
    pairs = zip(m.sources, train, strict=True)
    return int(min(m.max_epochs * d.tokens / s.share for s, d in pairs if s.share is not None))


def val_quotas(train_tokens: list[int], val: list[SourceDocs]) -> list[float]:
    """``val`` mixed to the shares ``train`` achieved, as large as its documents allow without repeats."""
    total = sum(train_tokens)
    weights = [t / total for t in train_tokens]
    size = min(
        (d.tokens / w for w, d in zip(weights, val, strict=True) if w > 0 and d.tokens > 0), default=0.0
    )
    return [w * size for w in weights]


def source_info(
    s: MixSource,
    default_field: str,
    docs: SourceDocs,
    taken: dict[str, Taken],
    doc_len: np.ndarray,
    total_train: int,
) -> MixSourceInfo:
    """The manifest's record of one source: where its documents and tokens went."""
    split_tokens = {name: int(doc_len[t.docs].sum()) for name, t in taken.items()}
    first = np.concatenate([t.docs[t.copy == 0] for t in taken.values()])
    repeats = np.concatenate([t.docs[t.copy > 0] for t in taken.values()])
    docs_packed, tokens_packed = len(first), int(doc_len[first].sum())
    return MixSourceInfo(
        name=s.name,
        inputs=s.inputs,
        text_field=s.text_field or default_field,
        share=s.share,
        epochs=s.epochs,
        docs_in=len(docs.docs),
        tokens_in=docs.tokens,
        docs_packed=docs_packed,
        tokens_packed=tokens_packed,
        docs_repeated=len(repeats),
        tokens_repeated=int(doc_len[repeats].sum()),
        docs_left_out=len(docs.docs) - docs_packed,
        tokens_left_out=docs.tokens - tokens_packed,
        train_tokens=split_tokens.get("train", 0),
        val_tokens=split_tokens.get("val", 0),
        achieved_share=split_tokens.get("train", 0) / total_train if total_train else 0.0,
    )


def mixture_info(m: Mixture, sources: tuple[MixSourceInfo, ...]) -> MixtureInfo:
    return MixtureInfo(seed=m.seed, max_epochs=m.max_epochs, total_tokens=m.total_tokens, sources=sources)


@dataclass(frozen=True, slots=True)
class Selection:
    """The mixture's choice: per split, the documents packed (indices among all) and their copy numbers."""

    splits: dict[str, Taken]
    """Ordered by copy, then document: whole epochs one after another."""
    info: MixtureInfo


def select(
    m: Mixture,
    default_field: str,
    doc_len: np.ndarray,
    val: np.ndarray | None,
    doc_hash: np.ndarray,
    doc_source: np.ndarray,
) -> Selection:
    """Choose every split's documents from the per-document arrays of pass 1 (a pure function of them).

    ``doc_source``: each document's source, an index into ``m.sources``.
    """
    keys = sample_keys(doc_hash, m.seed)
    is_val = np.zeros(len(doc_len), bool) if val is None else val.astype(bool)
    per_split: dict[str, list[SourceDocs]] = {"train": [], "val": []}
    for index in range(len(m.sources)):
        mine = doc_source == index
        for name, flag in (("train", ~is_val), ("val", is_val)):
            docs = np.flatnonzero(mine & flag)
            per_split[name].append(SourceDocs(docs, doc_len[docs].astype(np.int64), keys[docs]))
    train = [
        take(d.docs, d.lengths, d.keys, q, None, m.max_epochs)
        for d, q in zip(per_split["train"], train_quotas(m, per_split["train"]), strict=True)
    ]
    taken = {"train": train}
    if val is not None:
        got = [int(doc_len[t.docs].sum()) for t in train]
        quotas = val_quotas(got, per_split["val"])
        taken["val"] = [
            take(d.docs, d.lengths, d.keys, q, 1) for d, q in zip(per_split["val"], quotas, strict=True)
        ]
    total_train = sum(int(doc_len[t.docs].sum()) for t in train)
    infos = []
    for index, s in enumerate(m.sources):
        both = [per_split[n][index] for n in taken]
        whole = SourceDocs(
            np.concatenate([d.docs for d in both]), np.concatenate([d.lengths for d in both]), keys[:0]
        )
        mine = {n: t[index] for n, t in taken.items()}
        infos.append(source_info(s, default_field, whole, mine, doc_len, total_train))
    return Selection({n: _merged(t) for n, t in taken.items()}, mixture_info(m, tuple(infos)))


def _merged(parts: list[Taken]) -> Taken:
    docs = np.concatenate([p.docs for p in parts]) if parts else np.zeros(0, np.int64)
    copy = np.concatenate([p.copy for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.lexsort((docs, copy))
    return Taken(docs[order], copy[order])


def doc_sources(doc_id: np.ndarray, first_ids: Sequence[int], file_source: Sequence[int]) -> np.ndarray:
    """Each document's source: its doc id falls in an input file's range, and the file belongs to a source."""
    file_index = np.searchsorted(np.asarray(first_ids, np.int64), doc_id, side="right") - 1
    return np.asarray(file_source, np.int64)[file_index]
