"""Mixtures: which documents a recipe (prep/recipe.py) packs, and how often, as a pure function of pass 1.

Each source has either ``share`` (of the packed ``train`` tokens) or ``epochs``; ``max_epochs`` caps the
repetition of any source, ``total_tokens`` optionally fixes the size, ``seed`` the sample.
docs/mixtures.md has the rules.

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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prep.recipe import MixSource, Mixture, RecipeError
from shared.manifest import MixSourceInfo, MixtureInfo

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


class EmptySourceError(RecipeError):
    """A source with no `train` document: its fix changes the inputs (or `--val-fraction`), which shapes the
    tokenized work, so unlike a share the cap cannot meet it is not fixed by a `--resume`."""


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
            raise EmptySourceError(
                f"{m.where}: source `{s.name}` has no documents to pack in `train` (its inputs hold no text,"
                " or every document went to `val`); check its inputs and text field, or remove the source,"
                " and run the command again."
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
                f" train tokens for share {s.share:g} of {total:,.0f} tokens, above {m.key('max_epochs')} {m.max_epochs:g}."
                f" Raise {m.key('max_epochs')} to {math.ceil(quota / d.tokens * 100) / 100:g}, or give it a share of at most"
                f" {most / total:.4g}"
                + (f", or lower {m.key('total_tokens')} to {_most(m, train):,}." if m.total_tokens else ".")
            )
        quotas.append(quota)
    return quotas


def _most(m: Mixture, train: list[SourceDocs]) -> int:
    """The largest ``total_tokens`` that ``max_epochs`` allows for shares alone."""
    pairs = zip(m.sources, train, strict=True)
    return int(min(m.max_epochs * d.tokens / s.share for s, d in pairs if s.share is not None))


def val_quotas(train_tokens: list[int], val: list[SourceDocs], val_fraction: float) -> list[float]:
    """``val`` mixed to the shares ``train`` achieved, as large as its documents allow without repeats, and
    at most ``val_fraction`` of the packed tokens: a ``train`` sampled down to a few documents (a small
    source's share binds) does not leave ``val`` with most of the data."""
    total = sum(train_tokens)
    weights = [t / total for t in train_tokens]
    size = min(
        (d.tokens / w for w, d in zip(weights, val, strict=True) if w > 0 and d.tokens > 0), default=0.0
    )
    size = min(size, total * val_fraction / (1.0 - val_fraction))
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
    val_fraction: float = 0.0,
) -> Selection:
    """Choose every split's documents from the per-document arrays of pass 1 (a pure function of them).

    ``doc_source``: each document's source, an index into ``m.sources``; ``val_fraction``: what
    ``--val-fraction`` asked, the most of the packed tokens ``val`` takes.
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
        quotas = val_quotas(got, per_split["val"], val_fraction)
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
