"""`prep verify` on a pack of conversations: the label mask against a fresh rendering of a sample.

The row checks (shared/checks.py) accept a masked label anywhere in such a pack, and allow in documents
only the special tokens the chat template itself writes. What they cannot know is *which* tokens the
template and ``--train-on`` make targets; this module re-reads a sample of the inputs, renders each sampled
conversation again (prep/chat.py, with the roles and template the manifest records) and compares ids and
labels token for token. A stored target outside a chosen role's turn, a masked assistant token, or a
special id where the fresh rendering has content text (a control token made from content) all differ
from the fresh rendering and fail here, naming the token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prep.chat import IGNORE, ChatTemplate, fit_chat, load_chat_template
from prep.chat_pack import ChatJob, ChatSpec, record_field
from prep.readers import is_val
from prep.sources import read_texts, sample_doc_ids
from prep.tokenizer import LoadedTokenizer
from shared.checks import RowCheckError, SplitSegments
from shared.errors import UserError
from shared.manifest import Manifest
from shared.reader import Shard

_FIX = (
    "The shards were not packed from these inputs with this template and these roles, or their labels were"
    " edited; check --source, or re-run `prep pack`."
)


def _fail(message: str) -> RowCheckError:
    return RowCheckError("sources", message, _FIX)


def manifest_template(m: Manifest, tok: LoadedTokenizer) -> ChatTemplate | None:
    """The chat template a pack's manifest records (None when it rendered no conversation)."""
    origin = m.options.chat_template
    if origin is None:
        return None
    if Path(origin).name == "tokenizer_config.json":
        return load_chat_template(tok.info.path)
    if not Path(origin).is_file():
        raise UserError(
            f"the chat template `{origin}` the data was rendered with is gone; restore it to check the"
            " conversations' special tokens and labels."
        )
    return load_chat_template(tok.info.path, origin)


def template_special_ids(m: Manifest, tok: LoadedTokenizer) -> set[int]:
    """Ids of the special tokens the pack's chat template writes itself (its text or its named tokens):
    the only special ids, besides the EOS/BOS placed, allowed in a conversation."""
    template = manifest_template(m, tok)
    if template is None:
        return set()
    named = set(template.named_tokens.values())
    return {
        int(i)
        for i, t in tok.tokenizer.get_added_tokens_decoder().items()
        if t.special and (t.content in template.source or t.content in named)
    }


def _spec(m: Manifest, tok: LoadedTokenizer) -> ChatSpec:
    o = m.options
    train_on = frozenset((o.train_on or "assistant").split(","))
    max_tokens = m.seq_len - 1 - (m.tokenizer.bos_id is not None)
    return ChatSpec(manifest_template(m, tok), train_on, o.long_chats or "drop", max_tokens)


def _read(m: Manifest, sources: tuple[str, ...], wanted: np.ndarray) -> dict[int, tuple[str, str, str]]:
    """``doc_id -> (record format, text, where)`` of the wanted conversations and pairs that have text
    (documents beside them are left to the row checks, which cover their labels)."""
    kind_of = {info.first_doc_id: info.record_format or "text" for info in m.inputs}
    starts = np.array(sorted(kind_of))
    texts = read_texts(
        m, sources, wanted, lambda info, field: record_field(info.record_format or "text", field)
    )
    found = {}
    for doc_id, (text, where) in texts.items():
        kind = kind_of[int(starts[np.searchsorted(starts, doc_id, side="right") - 1])]
        if kind != "text" and text is not None:
            found[doc_id] = (kind, text, where)
    return found


def _expected(m: Manifest, tok: LoadedTokenizer, spec: ChatSpec, kind: str, text: str):
    """``(ids, labels)`` `prep pack` stores for one conversation or pair, or None when it is dropped."""
    job = ChatJob([], kind, spec)
    chat = fit_chat(job.encode_one(tok.tokenizer, text), spec.max_tokens, spec.long_chats)
    if chat is None:
        return None
    t = m.tokenizer
    bos = [t.bos_id] if t.bos_id is not None else []
    ids = np.array(bos + chat.input_ids.tolist() + [t.eos_id], np.int64)
    eos_label = t.eos_id if kind == "prompt-completion" else IGNORE
    labels = np.array([IGNORE] * len(bos) + chat.labels.tolist() + [eos_label], np.int64)
    labels[0] = IGNORE
    return ids, labels


def _stored(doc_id: int, segs: dict[str, SplitSegments], shards: dict[str, list[Shard]]):
    """``(split, ids, labels)`` of a stored conversation (one segment: conversations are never split)."""
    for name, s in segs.items():
        hits = np.flatnonzero(s.doc_id == doc_id)
        if len(hits) > 1:
            raise _fail(f"doc_id {doc_id} is stored as {len(hits)} segments; a conversation is never cut.")
        if len(hits):
            k = int(hits[0])
            row = shards[name][s.shard[k]].row(int(s.row[k]))
            a, b = row.cu_seqlens[int(s.index[k])], row.cu_seqlens[int(s.index[k]) + 1]
            return name, row.input_ids[a:b].astype(np.int64), row.labels[a:b].astype(np.int64)
    return None


def compare_chat_sources(
    m: Manifest,
    tok: LoadedTokenizer,
    sources: tuple[str, ...],
    shards: dict[str, list[Shard]],
    segs: dict[str, SplitSegments],
    sample: int,
) -> int:
    """Render a sample of the conversations and pairs again and compare ids and labels; return how many."""
    spec = _spec(m, tok)
    wanted = sample_doc_ids(m, segs, sample)
    found = _read(m, sources, wanted)
    for doc_id, (kind, text, where) in sorted(found.items()):
        expected = _expected(m, tok, spec, kind, text)
        stored = _stored(doc_id, segs, shards)
        if stored is None and expected is not None and m.mixture is not None:
            continue  # a mixture leaves documents out; its per-source counts cover them
        if expected is None or stored is None:
            if (expected is None) != (stored is None):
                state = "is stored" if stored is not None else "is missing from the shards"
                raise _fail(
                    f"doc_id {doc_id} (`{where}`) {state}, but `--long-chats {spec.long_chats}` says otherwise."
                )
            continue
        split, ids, labels = stored
        want = "val" if is_val(text, m.options.val_fraction) else "train"
        if split != want:
            raise _fail(
                f"doc_id {doc_id} (`{where}`) is stored in `{split}`, its content hash says `{want}`."
            )
        _compare(doc_id, where, expected, ids, labels, tok, spec)
    return len(found)


def _compare(doc_id, where, expected, ids, labels, tok: LoadedTokenizer, spec: ChatSpec) -> None:
    want_ids, want_labels = expected
    if len(want_ids) != len(ids) or (ids != want_ids).any():
        n = min(len(ids), len(want_ids))
        i = int(np.flatnonzero(np.append(ids[:n] != want_ids[:n], True))[0])
        raise _fail(
            f"doc_id {doc_id} (`{where}`): ids differ from a fresh rendering at token {i} (stored"
            f" {tok.decode(ids[i : i + 1])!r}, rendered {tok.decode(want_ids[i : i + 1])!r}; a special id"
            " from content, or another template)."
        )
    if (i := int(np.flatnonzero(np.append(labels != want_labels, True))[0])) < len(labels):
        roles = ", ".join(sorted(spec.train_on))
        what = (
            f"a target outside every trained turn ({roles})"
            if want_labels[i] == IGNORE
            else f"masked, though it lies in a trained turn ({roles})"
        )
        raise _fail(
            f"doc_id {doc_id} (`{where}`), token {i} ({tok.decode(ids[i : i + 1])!r}): the label is {labels[i]},"
            f" a fresh rendering gives {want_labels[i]}: {what}."
        )
