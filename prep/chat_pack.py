"""Conversations and prompt/completion pairs in `prep pack`: which inputs hold them, their ids and target masks.

The library that renders one conversation is prep/chat.py; this module puts it into the pack's stages:

    read     a `messages` list or a prompt/completion pair -> canonical JSON text (prep/readers.py Field)
    encode   ChatJob (in its place among the jobs, in the packing process, with `tokenizers`) -> ChatBatch:
             each conversation's ids and target mask, fitted to a row by `--long-chats`
    frame    ChatBatch -> streams BOS? + ids + EOS and a target mask per token (prep/stages.py frame_masked)

The EOS after a conversation is not a target (its closing token, `<|im_end|>`, already teaches the stop);
after a prompt/completion pair it is (nothing else ends the completion). Documents packed beside
conversations keep every token a target, as in a plain pack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from prep.chat import (
    IGNORE,
    ChatError,
    ChatIds,
    ChatTemplate,
    check_tokenizer_for_chat,
    encode_chat,
    fit_chat,
)
from prep.chat_record import short
from prep.encoder import JsonlChunk, LocalJob, RecordsJob, job_texts
from prep.readers import PAIR_FIELDS, BatchRecords, Field, InputFile, first_record
from shared.errors import UserError

FORMATS = ("auto", "text", "chat", "prompt-completion")
CHAT_FIELD = "messages"
"""The field of a conversation, unless `--text-field` names another."""
KEPT, TRUNCATED, DROPPED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ChatSpec:
    """How conversations and pairs become ids and targets in one pack."""

    template: ChatTemplate | None
    """None when no input holds conversations."""
    train_on: frozenset[str]
    long_chats: str
    max_tokens: int
    """Tokens a conversation may keep: ``seq_len`` less the EOS (and BOS) the frame adds."""


def record_kind_of(first: dict | None, text_field: str) -> str:
    """`--format auto`: what an input's first record holds."""
    if first is None:
        return "text"
    field = chat_field(text_field)
    if isinstance(first.get(field), list):
        return "chat"
    if all(k in first for k in PAIR_FIELDS) and text_field not in first:
        return "prompt-completion"
    return "text"


def chat_field(text_field: str) -> str:
    """The field of a conversation: `messages`, unless `--text-field` names another than `text`."""
    return CHAT_FIELD if text_field == "text" else text_field


def resolve_kinds(fmt: str, text_field: str, sources: list[InputFile]) -> tuple[str, ...]:
    """The record format of every input: ``fmt``, or under ``auto`` each file's own from its first record."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}.")
    kinds = []
    for source in sources:
        kind = record_kind_of(first_record(source), text_field) if fmt == "auto" else fmt
        if kind != "text" and source.format in ("text", "csv", "tsv"):
            raise UserError(
                f"`{source.path}` is a {source.format} file: its records are text, not {kind} records. Pass"
                " JSONL, JSON, Parquet or a saved dataset, or pack it with `--format text`."
            )
        kinds.append(kind)
    return tuple(kinds)


def record_field(kind: str, text_field: str) -> Field:
    """The :class:`Field` the readers read for an input of record format ``kind``."""
    name = chat_field(text_field) if kind == "chat" else text_field
    return Field(name, kind)


def pack_format(kinds: tuple[str, ...]) -> str:
    """What the manifest records: the one record format of every input, or ``mixed``."""
    distinct = sorted(set(kinds))
    return distinct[0] if len(distinct) == 1 else "mixed"


@dataclass(frozen=True, slots=True)
class ChatBatch:
    """A job's conversations (or pairs): kept ones' ids and targets back to back, every one's fate."""

    ids: np.ndarray
    """int32, the kept conversations' ids (fitted to a row), back to back."""
    targets: np.ndarray
    """uint8 per id: 1 where it is learnt."""
    lengths: np.ndarray
    """int64 per conversation: ids kept (0 when dropped)."""
    full_lengths: np.ndarray
    """int64 per conversation: ids before `--long-chats`."""
    fate: np.ndarray
    """int8 per conversation: KEPT, TRUNCATED or DROPPED."""


@dataclass(slots=True)
class ChatJob(LocalJob):
    """A job of conversations or pairs, encoded in the packing process when its turn comes."""

    inner: list[str] | RecordsJob | JsonlChunk
    kind: str
    spec: ChatSpec

    @property
    def records(self) -> BatchRecords | None:  # type: ignore[override]
        return self.inner.records if not isinstance(self.inner, list) else None

    @records.setter
    def records(self, value: BatchRecords | None) -> None:
        """What a worker that decoded a JSONL chunk sends back (prep/encoder.py)."""
        if isinstance(self.inner, JsonlChunk) and value is not None:
            self.inner.records = value

    def encode(self, tokenizer: Tokenizer) -> ChatBatch:
        chats = [self.encode_one(tokenizer, text) for text in job_texts(self.inner)]
        return batch_of(chats, self.spec)

    def encode_one(self, tokenizer: Tokenizer, text: str) -> ChatIds:
        """One record's ids and labels, before `--long-chats`."""
        value = json.loads(text)
        if self.kind == "chat":
            assert self.spec.template is not None
            try:
                return encode_chat(tokenizer, self.spec.template, value, self.spec.train_on)
            except ChatError as e:  # the reader has no line for it here: name the record by its start
                raise ChatError(f"conversation {short(value)}: {e}") from e
        return encode_pair(tokenizer, value["prompt"], value["completion"])


def encode_pair(tokenizer: Tokenizer, prompt: str, completion: str) -> ChatIds:
    """A prompt/completion pair: the prompt's ids then the completion's, each tokenized alone (special-token
    text kept as text), the completion's the only targets."""
    p = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    c = tokenizer.encode(completion, add_special_tokens=False).ids
    ids = np.array(p + c, dtype=np.int32)
    labels = np.concatenate([np.full(len(p), IGNORE, np.int32), np.array(c, np.int32)])
    return ChatIds(ids, labels, (len(ids),))


def batch_of(chats: list[ChatIds], spec: ChatSpec) -> ChatBatch:
    fitted = [fit_chat(c, spec.max_tokens, spec.long_chats) for c in chats]
    kept = [f for f in fitted if f is not None]
    fate = [
        DROPPED if f is None else TRUNCATED if len(f.input_ids) < len(c.input_ids) else KEPT
        for c, f in zip(chats, fitted, strict=True)
    ]
    return ChatBatch(
        ids=np.concatenate([f.input_ids for f in kept]).astype(np.int32) if kept else np.zeros(0, np.int32),
        targets=(
            np.concatenate([f.labels != IGNORE for f in kept]).astype(np.uint8)
            if kept
            else np.zeros(0, np.uint8)
        ),
        lengths=np.array([0 if f is None else len(f.input_ids) for f in fitted], dtype=np.int64),
        full_lengths=np.array([len(c.input_ids) for c in chats], dtype=np.int64),
        fate=np.array(fate, dtype=np.int8),
    )


def chat_spec(
    kinds: tuple[str, ...],
    tokenizer: Tokenizer,
    template: ChatTemplate | None,
    train_on: tuple[str, ...],
    long_chats: str,
    max_tokens: int,
) -> ChatSpec:
    """The pack's :class:`ChatSpec`; refuses a tokenizer that cannot render conversations exactly."""
    if "chat" in kinds:
        check_tokenizer_for_chat(tokenizer)
    return ChatSpec(template, frozenset(train_on), long_chats, max_tokens)
