"""Re-read and re-tokenize a sample of source records and compare them, token for token, with the shards.

Doc ids count records across the inputs in input order (``manifest.inputs`` gives each file's first id and
record count), so re-reading the same inputs in the same order with the same readers gives every stored
document's text back. A record that was skipped, or dropped as too long, must be absent from the shards;
every other record must be stored as BOS? + ids + EOS, truncated when ``--long-docs truncate`` says so,
in the split its content hash chooses. A mixture's record may be left out (its per-source counts are
checked against the shards elsewhere) and read with its source's text field.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from prep.discovery import discover_inputs
from prep.readers import InputError, is_val, read_records
from prep.tokenizer import LoadedTokenizer
from shared.checks import RowCheckError, SplitSegments
from shared.manifest import InputInfo, Manifest
from shared.reader import Shard

_FIX = "The shards were not packed from these inputs, in this order, with this tokenizer; check --source."
_MAX_FRAGMENTED = 16


def _fail(message: str) -> RowCheckError:
    return RowCheckError("sources", message, _FIX)


def sample_doc_ids(m: Manifest, segs: dict[str, SplitSegments], sample: int) -> np.ndarray:
    """A fixed-seed sample of record ids, plus a few documents stored in fragments (the hard cases)."""
    rng = np.random.default_rng(0)
    n = m.documents.docs_in
    picked = rng.choice(n, size=min(sample, n), replace=False)
    fragmented = []
    for s in segs.values():
        ids, counts = np.unique(s.doc_id, return_counts=True)
        # A mixture's repeated copy is stored as doc_id + copy * docs_in: its record is doc_id % docs_in.
        fragmented.append(ids[counts > 1][:_MAX_FRAGMENTED] % max(n, 1))
    return np.unique(np.concatenate([picked, *fragmented]).astype(np.int64))


def read_texts(
    m: Manifest,
    sources: tuple[str, ...],
    wanted: np.ndarray,
    field_of: Callable[[InputInfo, str], str] | None = None,
) -> dict[int, tuple[str | None, str]]:
    """``doc_id -> (text or None if the record has a problem, where)`` for the wanted ids, each input read
    with the text field it was packed with (its mixture source's, else the pack's); ``field_of(info, field)``
    turns that field into the one to read (a conversation's, prep/chat_verify.py)."""
    # The split each DatasetDict input was read as is recorded; the same discovery finds the same files.
    files = discover_inputs(sources, m.options.dataset_split).files
    if len(files) != len(m.inputs):
        raise _fail(
            f"--source expands to {len(files)} files, the dataset was packed from {len(m.inputs)}: {_listed(m)}."
        )
    wanted_set = set(wanted.tolist())
    found: dict[int, tuple[str | None, str]] = {}
    for source, info in zip(files, m.inputs, strict=True):
        if source.dataset_split != info.dataset_split:
            raise _fail(
                f"`{source.path}` is read as split {source.dataset_split!r}, the manifest says `{info.path}`"
                f" was read as split {info.dataset_split!r}."
            )
        count = 0
        field = _text_field(m, info.source)
        if field_of is not None:
            field = field_of(info, field)
        try:
            for count, record in enumerate(read_records(source, field, lambda n: None), start=1):
                doc_id = info.first_doc_id + count - 1
                if doc_id in wanted_set:
                    found[doc_id] = (record.text if record.problem is None else None, record.where)
        except InputError as e:  # most often inputs given in another order: the text field is another's
            raise _fail(
                f"`{source.path}` cannot be read as the manifest's `{info.path}` (text field `{field}`): {e}"
                f" The inputs, in the order `prep pack` read them: {_listed(m)}."
            ) from None
        if count != info.num_records:
            raise _fail(
                f"`{source.path}` holds {count:,} records, the manifest says `{info.path}` had {info.num_records:,}."
            )
    return found


def _listed(m: Manifest) -> str:
    return ", ".join(f"`{i.path}`" for i in m.inputs)


def _text_field(m: Manifest, source: str | None) -> str:
    """The text field an input was read with: its mixture source's, else the pack's."""
    mixed = {s.name: s.text_field for s in m.mixture.sources} if m.mixture else {}
    return mixed.get(source or "", m.options.text_field)


def _stored(doc_id: int, segs: SplitSegments, order: np.ndarray, shards: list[Shard]) -> np.ndarray | None:
    sorted_ids = segs.doc_id[order]
    lo, hi = (
        np.searchsorted(sorted_ids, doc_id, side="left"),
        np.searchsorted(sorted_ids, doc_id, side="right"),
    )
    if lo == hi:
        return None
    pieces = []
    for s in order[lo:hi]:
        row = shards[segs.shard[s]].row(int(segs.row[s]))
        i = int(segs.index[s])
        pieces.append(row.input_ids[row.cu_seqlens[i] : row.cu_seqlens[i + 1]])
    return np.concatenate(pieces)


def _expected(m: Manifest, ids: list[int]) -> list[int] | None:
    """The stream `prep pack` stores for a document, or None when the long-document policy drops it."""
    t, seq_len = m.tokenizer, m.seq_len
    stream = ([t.bos_id] if t.bos_id is not None else []) + ids + [t.eos_id]
    if len(stream) > seq_len:
        if m.options.long_docs == "drop":
            return None
        if m.options.long_docs == "truncate":
            return stream[: seq_len - 1] + [t.eos_id]
    return stream


def compare_sources(
    m: Manifest,
    tok: LoadedTokenizer,
    sources: tuple[str, ...],
    shards: dict[str, list[Shard]],
    segs: dict[str, SplitSegments],
    sample: int,
) -> int:
    """Compare a sample of records with the shards; return how many were compared."""
    wanted = sample_doc_ids(m, segs, sample)
    texts = read_texts(m, sources, wanted)
    present = [t for t in wanted.tolist() if texts.get(t, (None,))[0] is not None]
    encoded = dict(zip(present, tok.encode_batch([texts[t][0] for t in present]), strict=True))
    orders = {name: np.argsort(s.doc_id, kind="stable") for name, s in segs.items()}
    for doc_id in wanted.tolist():
        text, where = texts.get(doc_id, (None, f"record {doc_id}"))
        stored, split = None, None
        for name, s in segs.items():
            stored = _stored(doc_id, s, orders[name], shards[name])
            if stored is not None:
                split = name
                break
        expected = None if text is None else _expected(m, encoded[doc_id])
        if expected is None:
            if stored is not None:
                why = "has no usable text" if text is None else "is longer than seq_len and --long-docs drop"
                raise _fail(
                    f"doc_id {doc_id} (`{where}`) {why}, yet the shards store {len(stored)} tokens for it."
                )
            continue
        if stored is None:
            if m.mixture is not None:  # a mixture leaves documents out; the per-source counts cover them
                continue
            raise _fail(f"doc_id {doc_id} (`{where}`) is missing from the shards.")
        want = "val" if is_val(text, m.options.val_fraction) else "train"
        if split != want:
            raise _fail(
                f"doc_id {doc_id} (`{where}`) is stored in `{split}`, but its content hash with val_fraction"
                f" {m.options.val_fraction} puts it in `{want}`."
            )
        _compare(doc_id, where, np.asarray(expected, dtype=np.int64), stored.astype(np.int64), tok)
    return len(wanted)


def _compare(doc_id: int, where: str, expected: np.ndarray, stored: np.ndarray, tok: LoadedTokenizer) -> None:
    n = min(len(expected), len(stored))
    diff = np.flatnonzero(expected[:n] != stored[:n])
    if len(diff) == 0 and len(expected) == len(stored):
        return
    i = int(diff[0]) if len(diff) else n
    got = f"{stored[i]} ({tok.decode([stored[i]])!r})" if i < len(stored) else "the end"
    want = f"{expected[i]} ({tok.decode([expected[i]])!r})" if i < len(expected) else "the end"
    raise _fail(
        f"doc_id {doc_id} (`{where}`): the shards hold {len(stored)} tokens, re-tokenizing gives {len(expected)};"
        f" first difference at token {i}: stored {got}, expected {want}."
    )
