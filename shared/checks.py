"""Vectorised checks of the packed-row contract, one Arrow record batch at a time (numpy only, no torch).

`prep verify` runs them over every batch of every shard; the trainer may run them on what it loads.
:func:`check_batch` checks what a batch shows on its own (structure, token ids, EOS placement, positions,
labels, stray special tokens) and returns one entry per segment; :func:`check_documents` then checks,
across all batches of a split, that every document's segments are fragments in order that end with
exactly one EOS. Every failure raises :class:`RowCheckError` naming the check, the shard, the row, the
segment and the token, with what was expected and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shared.contract import CU_SEQLENS, DOC_IDS, IGNORE_INDEX, INPUT_IDS, LABELS, POSITION_IDS
from shared.errors import InvariantError

CHECKS = (
    "tokenizer",
    "files",
    "structure",
    "tokens",
    "eos",
    "positions",
    "labels",
    "special",
    "documents",
    "sources",
    "inputs",
)
"""Check classes in the order `prep verify` runs them; a failure names one of them. This module implements
structure through documents; `tokenizer`, `files`, `sources` and `inputs` need the manifest, files and
inputs."""

_REPACK = "The shard does not hold what `prep pack` writes; re-run `prep pack` (or restore the file)."


class RowCheckError(InvariantError):
    """A row breaks the contract; ``check`` is one of :data:`CHECKS`."""

    def __init__(self, check: str, message: str, fix: str = _REPACK) -> None:
        # "<check> check failed:", not "[<check>]": rich would read brackets as markup and drop them.
        super().__init__(f"{check} check failed: {message} {fix}".rstrip())
        self.check = check


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenRules:
    """What the tokens of a dataset must satisfy, from its manifest (and tokenizer, when known)."""

    seq_len: int
    eos_id: int
    bos_id: int | None = None
    vocab_size: int | None = None
    """Ids must be below this; ``None`` skips the range check."""
    special_ids: tuple[int, ...] = ()
    """Special-token ids other than the EOS/BOS placed by `prep pack`: none may appear in a document."""
    masked_labels: bool = False
    """Labels follow a target mask (a pack of conversations: the manifest's ``options.format``): a label is
    its token or ``-100``. Otherwise every label but a segment's first is its token."""


@dataclass(frozen=True, slots=True)
class BatchSegments:
    """One entry per segment of a checked batch, in storage order."""

    doc_id: np.ndarray
    length: np.ndarray
    row: np.ndarray
    """Row index inside the shard."""
    index: np.ndarray
    """Segment index inside its row."""
    ends_with_eos: np.ndarray
    starts_with_bos: np.ndarray
    num_target_tokens: int


@dataclass(frozen=True, slots=True)
class _Lists:
    offsets: np.ndarray
    values: np.ndarray


def _lists(batch: pa.RecordBatch, name: str, where: str) -> _Lists:
    column = batch.column(name)
    if column.null_count or column.values.null_count:
        raise RowCheckError("structure", f"{where}: column `{name}` holds nulls; rows never do.")
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return _Lists(offsets - offsets[0], values)


class _Locator:
    """Turns an index into a batch's flat token or segment arrays into `shard, row, segment, token` text."""

    def __init__(self, shard: str, row_base: int, tok_off: np.ndarray, seg_start: np.ndarray, seg_row, doc):
        self.shard, self.row_base, self.tok_off = shard, row_base, tok_off
        self.seg_start, self.seg_row, self.doc = seg_start, seg_row, doc

    def row(self, r: int) -> str:
        return f"shard `{self.shard}`, row {self.row_base + r}"

    def seg(self, s: int) -> str:
        r = int(self.seg_row[s])
        first = int(np.searchsorted(self.seg_row, r, side="left"))
        return f"{self.row(r)}, segment {s - first} (doc_id {int(self.doc[s])})"

    def token(self, t: int) -> str:
        s = int(np.searchsorted(self.seg_start, t, side="right")) - 1
        return f"{self.seg(s)}, token {t - int(self.seg_start[s])} of the segment"


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _check_lengths(ids: _Lists, labels: _Lists, pos: _Lists, rules: TokenRules, loc: _Locator) -> np.ndarray:
    n_ids, n_lab, n_pos = np.diff(ids.offsets), np.diff(labels.offsets), np.diff(pos.offsets)
    if (r := _first((n_ids != n_lab) | (n_ids != n_pos))) is not None:
        raise RowCheckError(
            "structure",
            f"{loc.row(r)}: column lengths differ (input_ids {n_ids[r]}, labels {n_lab[r]},"
            f" position_ids {n_pos[r]}); every token has one of each.",
        )
    if (r := _first((n_ids < 1) | (n_ids > rules.seq_len))) is not None:
        raise RowCheckError(
            "structure", f"{loc.row(r)} has {n_ids[r]} tokens; expected 1 to seq_len {rules.seq_len}."
        )
    return n_ids


def _check_cu_seqlens(cu: _Lists, docs: _Lists, row_len: np.ndarray, loc: _Locator) -> np.ndarray:
    """Validate each row's boundaries; return a mask over ``cu.values`` of the entries that start a segment."""
    n_cu, n_doc = np.diff(cu.offsets), np.diff(docs.offsets)
    if (r := _first((n_doc < 1) | (n_cu != n_doc + 1))) is not None:
        raise RowCheckError(
            "structure",
            f"{loc.row(r)}: cu_seqlens has {n_cu[r]} entries and doc_ids {n_doc[r]}; expected"
            f" {n_doc[r] + 1} (one more boundary than segments, at least one segment).",
        )
    first, last = cu.values[cu.offsets[:-1]], cu.values[cu.offsets[1:] - 1]
    if (r := _first((first != 0) | (last != row_len))) is not None:
        raise RowCheckError(
            "structure",
            f"{loc.row(r)}: cu_seqlens runs from {first[r]} to {last[r]}; expected 0 to the row length"
            f" {row_len[r]} (cu_seqlens = {cu.values[cu.offsets[r] : cu.offsets[r + 1]].tolist()[:12]}).",
        )
    steps = np.diff(cu.values)
    inside = np.ones(len(steps), dtype=bool)
    inside[cu.offsets[1:-1] - 1] = False  # the step from one row's last entry to the next row's first
    if (i := _first(inside & (steps <= 0))) is not None:
        r = int(np.searchsorted(cu.offsets, i, side="right")) - 1
        raise RowCheckError(
            "structure",
            f"{loc.row(r)}: cu_seqlens is not strictly increasing ({cu.values[i]} then {cu.values[i + 1]});"
            " every segment holds at least one token.",
        )
    starts = np.ones(len(cu.values), dtype=bool)
    starts[cu.offsets[1:] - 1] = False
    return starts


def check_batch(batch: pa.RecordBatch, rules: TokenRules, *, shard: str, row_base: int = 0) -> BatchSegments:
    """Check every row of ``batch``; raise :class:`RowCheckError` at the first failure, in :data:`CHECKS` order.

    ``shard`` and ``row_base`` (the shard row of the batch's first row) only serve the messages.
    """
    where = f"shard `{shard}`"
    ids, labels, pos = (_lists(batch, n, where) for n in (INPUT_IDS, LABELS, POSITION_IDS))
    cu, docs = _lists(batch, CU_SEQLENS, where), _lists(batch, DOC_IDS, where)
    nrows = batch.num_rows
    loc = _Locator(shard, row_base, ids.offsets, np.zeros(0, np.int64), np.zeros(0, np.int64), docs.values)
    row_len = _check_lengths(ids, labels, pos, rules, loc)
    is_start = _check_cu_seqlens(cu, docs, row_len, loc)

    n_seg = np.diff(docs.offsets)
    seg_row = np.repeat(np.arange(nrows, dtype=np.int64), n_seg)
    rel_start = cu.values[is_start].astype(np.int64)
    rel_end = cu.values[np.flatnonzero(is_start) + 1].astype(np.int64)
    seg_len = rel_end - rel_start
    seg_start = ids.offsets[seg_row] + rel_start
    seg_last = seg_start + seg_len - 1
    loc = _Locator(shard, row_base, ids.offsets, seg_start, seg_row, docs.values)
    tokens = ids.values

    _check_vocab(tokens, rules, loc)
    _check_eos_bos(tokens, seg_start, seg_last, rules, loc)
    _check_positions(pos.values, seg_start, seg_len, loc)
    _check_labels(tokens, labels.values, seg_start, rules, loc)
    _check_special(tokens, rules, loc)

    index = np.arange(len(seg_len), dtype=np.int64) - np.repeat(docs.offsets[:-1], n_seg)
    bos = rules.bos_id
    return BatchSegments(
        doc_id=docs.values.astype(np.int64),
        length=seg_len,
        row=seg_row + row_base,
        index=index,
        ends_with_eos=tokens[seg_last] == rules.eos_id,
        starts_with_bos=tokens[seg_start] == bos if bos is not None else np.zeros(len(seg_len), bool),
        num_target_tokens=int((labels.values != IGNORE_INDEX).sum()),
    )


def _check_vocab(tokens: np.ndarray, rules: TokenRules, loc: _Locator) -> None:
    if rules.vocab_size is None:
        return
    if (t := _first((tokens < 0) | (tokens >= rules.vocab_size))) is not None:
        raise RowCheckError(
            "tokens",
            f"{loc.token(t)}: input id {tokens[t]} is outside the vocabulary 0..{rules.vocab_size - 1}.",
        )


def _check_positions(pos: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray, loc: _Locator) -> None:
    expected = np.arange(len(pos), dtype=np.int64) - np.repeat(seg_start, seg_len)
    if (t := _first(pos != expected)) is not None:
        raise RowCheckError(
            "positions",
            f"{loc.token(t)}: position_ids is {pos[t]}, expected {expected[t]}; positions count"
            " 0..n-1 within every segment.",
        )


def _check_special(tokens: np.ndarray, rules: TokenRules, loc: _Locator) -> None:
    if not rules.special_ids:
        return
    special = np.isin(tokens, np.asarray(rules.special_ids, dtype=tokens.dtype))
    if (t := _first(special)) is not None:
        raise RowCheckError(
            "special",
            f"{loc.token(t)}: special-token id {tokens[t]} inside a document. Document text was tokenized"
            " with special tokens active (a literal marker such as `<|endoftext|>` became a control"
            " token); re-pack with this version of `prep pack`, which encodes such text as text.",
        )


def _check_eos_bos(
    tokens: np.ndarray, seg_start: np.ndarray, seg_last: np.ndarray, rules: TokenRules, loc: _Locator
) -> None:
    stray = tokens == rules.eos_id
    stray[seg_last] = False  # an EOS may end a segment; whether it is the document's last is checked later
    if (t := _first(stray)) is not None:
        raise RowCheckError(
            "eos",
            f"{loc.token(t)}: EOS id {rules.eos_id} before the end of its segment; a document holds exactly"
            " one EOS, as its last token (an extra separator, or EOS used as padding).",
        )
    if rules.bos_id is not None:
        stray = tokens == rules.bos_id
        stray[seg_start] = False
        if (t := _first(stray)) is not None:
            raise RowCheckError(
                "eos",
                f"{loc.token(t)}: BOS id {rules.bos_id} after the start of its segment; BOS only opens a document.",
            )


def _check_labels(
    tokens: np.ndarray, labels: np.ndarray, seg_start: np.ndarray, rules: TokenRules, loc: _Locator
) -> None:
    expected = tokens.astype(np.int64)
    expected[seg_start] = IGNORE_INDEX
    wrong = labels != expected
    if rules.masked_labels:  # a masked target is allowed anywhere; another value, or a first token, is not
        wrong &= labels != IGNORE_INDEX
    t = _first(wrong)
    if t is None:
        return
    if expected[t] == IGNORE_INDEX:
        why = (
            f"label is {labels[t]}, expected {IGNORE_INDEX} at a segment's first token: as a target it would be"
            " predicted from the previous document."
        )
    elif labels[t] == IGNORE_INDEX and tokens[t] == rules.eos_id:
        why = f"the EOS is masked (label {IGNORE_INDEX}); it must be a target so the model learns to end documents."
    else:
        why = f"label is {labels[t]}, expected {expected[t]} (labels are unshifted copies of input_ids)."
    raise RowCheckError("labels", f"{loc.token(t)}: {why}")


@dataclass(frozen=True, slots=True)
class SplitSegments:
    """The segments of every batch of a split, concatenated; ``shard`` indexes into ``shard_names``."""

    shard_names: tuple[str, ...]
    shard: np.ndarray
    doc_id: np.ndarray
    length: np.ndarray
    row: np.ndarray
    index: np.ndarray
    ends_with_eos: np.ndarray
    starts_with_bos: np.ndarray

    @classmethod
    def concat(cls, shard_names: list[str], parts: list[tuple[int, BatchSegments]]) -> SplitSegments:
        fields = ("doc_id", "length", "row", "index", "ends_with_eos", "starts_with_bos")

        def cat(name: str) -> np.ndarray:
            arrays = [getattr(p, name) for _, p in parts]
            return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)

        shard = np.concatenate(
            [np.full(len(p.doc_id), i, np.int32) for i, p in parts] or [np.zeros(0, np.int32)]
        )
        return cls(tuple(shard_names), shard, **{f: cat(f) for f in fields})

    def where(self, s: int) -> str:
        return (
            f"shard `{self.shard_names[self.shard[s]]}`, row {self.row[s]}, segment {self.index[s]}"
            f" (doc_id {self.doc_id[s]})"
        )


def check_documents(segs: SplitSegments, *, has_bos: bool) -> None:
    """Every document's segments, in storage order: one EOS, ending the last; BOS first; one segment per row.

    Fragments store no offsets, so a lost middle fragment is invisible here; the manifest's token
    accounting (and a re-tokenized ``--source`` sample) catches it.
    """
    order = np.argsort(segs.doc_id, kind="stable")
    doc = segs.doc_id[order]
    last = np.ones(len(doc), dtype=bool)
    last[:-1] = doc[1:] != doc[:-1]
    first = np.ones(len(doc), dtype=bool)
    first[1:] = doc[1:] != doc[:-1]
    eos = segs.ends_with_eos[order]

    if (i := _first(last & ~eos)) is not None:
        raise RowCheckError(
            "eos",
            f"document {doc[i]} has no EOS: its last segment ({segs.where(order[i])}) does not end with it"
            " (a fragment holding the document's end is missing, or the EOS was dropped).",
        )
    if (i := _first(~last & eos)) is not None:
        raise RowCheckError(
            "eos",
            f"document {doc[i]} has more than one EOS: {segs.where(order[i])} ends with EOS but the document"
            f" continues at {segs.where(order[i + 1])} (an extra EOS, or fragments out of order).",
        )
    same_row = (segs.shard[order][1:] == segs.shard[order][:-1]) & (
        segs.row[order][1:] == segs.row[order][:-1]
    )
    if (i := _first(~last[:-1] & same_row)) is not None:
        raise RowCheckError(
            "documents",
            f"document {doc[i]} has two segments in one row ({segs.where(order[i])} and segment"
            f" {segs.index[order[i + 1]]}); its second part could not attend to its first.",
        )
    if has_bos:
        bos = segs.starts_with_bos[order]
        if (i := _first(first != bos)) is not None:
            state = "lacks" if first[i] else "repeats"
            raise RowCheckError(
                "eos",
                f"document {doc[i]}: {segs.where(order[i])} {state} the BOS; only a document's first"
                " segment starts with BOS.",
            )
