"""The stages of `prep pack`: read -> encode -> frame -> journal -> plan -> write -> finish.

Each stage is a function over one typed record; the executors (prep/executor_local.py and
prep/executor_ray.py) only decide where the stages run, so both write the same bytes by construction.
docs/design.md draws the flow::

    read     input files          -> ReadBatch     (a job of records, and where it sits in its source)
    encode   ReadBatch            -> EncodedBatch  (the encoder, prep/encoder.py)
    frame    records + ids        -> Framed        (BOS? ids EOS per document, long-document policy)
    journal  Framed               -> work files    (local only: committed batch by batch, prep/journal.py)
    plan     document lengths     -> SplitPlan     (one row plan per split, prep/packing.py)
    write    SplitPlan + tokens   -> shards        (prep/writer.py)
    finish   everything counted   -> manifest.json, then the card

What grows with the corpus is a few arrays of one entry per document (or segment) in planning and
writing (see docs/reliability.md, "Memory: bytes per document").
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from prep import __version__
from prep.card import CARD_FLAGS, CARD_KEYS, check_card_info, write_card
from prep.chat import LONG_CHAT_RULES, load_chat_template
from prep.chat_pack import (
    DROPPED,
    FORMATS,
    TRUNCATED,
    ChatBatch,
    ChatJob,
    ChatSpec,
    pack_format,
    record_field,
    resolve_kinds,
)
from prep.encoder import Encoder, Job, empty_job, source_jobs
from prep.fast_bpe import EncodedBatch
from prep.journal import Journal, input_stats, kill_point
from prep.mixture import Selection, doc_sources, select
from prep.outdir import WORK_DIR
from prep.packing import STRATEGIES, RowPlan, index_dtype, make_plan
from prep.provenance import STDIN, Fingerprint, InputDigest
from prep.readers import EMPTY, MISSING_FIELD, BatchRecords, InputError, InputFile
from prep.recipe import Mixture
from prep.streams import build_streams
from prep.tokenizer import LoadedTokenizer
from shared.contract import SPLITS, shard_metadata
from shared.errors import UserError
from shared.manifest import (
    MAX_INT32,
    CardInfo,
    DocumentAccounting,
    IgnoredInput,
    InputInfo,
    Manifest,
    MixtureInfo,
    PackOptions,
    SplitInfo,
)

LONG_DOC_POLICIES = ("split", "truncate", "drop")
EXECUTORS = ("local", "ray")
READ_BLOCK = 1 << 20
"""Entries read at a time from a per-document array."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PackConfig:
    inputs: tuple[str, ...]
    """Files, folders or globs, read in the order given."""
    tokenizer: str
    """A tokenizer.json, or a model folder holding one."""
    out: Path
    seq_len: int = 1024
    """Maximum tokens per packed row."""
    strategy: str = "bfd"
    text_field: str = "text"
    dataset_split: str | None = None
    """The split to read of every saved DatasetDict input; needed when one has several (prep/discovery.py)."""
    eos_token: str | None = None
    """Default: the tokenizer's own EOS (from tokenizer_config.json, else a well-known name)."""
    bos_token: str | None = None
    long_docs: str = "split"
    """What to do with a document longer than ``seq_len``: cut it into fragments, truncate it, or drop it."""
    val_fraction: float = 0.0
    """Share of documents (chosen by a hash of their text) written to the ``val`` split."""
    workers: int | None = None
    """Processes for tokenization; default every core."""
    rows_per_shard: int | None = None
    skip_invalid: bool = False
    """Count and skip malformed records instead of stopping at the first one."""
    overwrite: bool = False
    resume: bool = False
    """Continue the interrupted run in ``out`` from its journal (same options and inputs required)."""
    executor: str = "local"
    """``local`` (every core of this machine) or ``ray`` (Ray tasks across a cluster; same output bytes)."""
    ray_address: str | None = None
    """Ray cluster to join with ``executor="ray"``; default ``RAY_ADDRESS``, else a Ray started on this machine."""
    license: str | None = None
    """The data's license, an SPDX-style id or ``other``: the card's ``license`` (and the manifest's)."""
    language: tuple[str, ...] = ()
    """ISO 639-1/639-3 codes of the documents' languages: the card's ``language``."""
    source_datasets: tuple[str, ...] = ()
    """The datasets the documents come from: the card's ``source_datasets``."""
    description: str | None = None
    """What the data is, in words: the card's description."""
    mixture: Mixture | None = None
    """Sources mixed to shares or epochs (prep/recipe.py, prep/mixture.py); their inputs are ``inputs``."""

    format: str = "auto"
    """What the records hold: ``text``, ``chat`` (a `messages` list), ``prompt-completion``, or ``auto``
    (each input's first record tells; prep/chat_pack.py)."""
    chat_template: str | None = None
    """A Jinja chat template file; default the tokenizer's own (prep/chat.py)."""
    train_on: tuple[str, ...] = ("assistant",)
    """Roles whose turns are targets in conversations."""
    long_chats: str = "drop"
    """Conversations longer than a row: ``drop`` or ``truncate`` after the last whole trained turn."""

    def __post_init__(self) -> None:
        check_card_fields(self)
        check_chat_options(self)
        if self.executor not in EXECUTORS:
            raise UserError(f"--executor {self.executor!r} is unknown; choose one of {', '.join(EXECUTORS)}.")
        if self.ray_address is not None and self.executor != "ray":
            raise UserError(
                f"--ray-address {self.ray_address!r} needs `--executor ray`; add it, or drop the address."
            )
        if self.resume and self.executor == "ray":
            raise UserError(
                "`--resume` is not supported with `--executor ray` (a Ray pack keeps no journal); pass"
                " `--overwrite` to pack again from the start, or finish the run with `--executor local`."
            )
        if STDIN in self.inputs and self.resume:
            raise UserError(
                "`--resume` cannot continue a pack that reads standard input (`-`): what was read is gone."
                " Save the input to a file and pack that (`... > corpus.jsonl`), or pass `--overwrite` to"
                " pack again from the start."
            )
        if STDIN in self.inputs and self.executor == "ray":
            raise UserError(
                "`--executor ray` cannot read standard input (`-`): Ray tasks read inputs by path. Save it to"
                " a file on storage every node sees, or use `--executor local`."
            )
        if self.resume and self.overwrite:
            raise UserError(
                "pass either `--resume` (continue the interrupted run) or `--overwrite`, not both."
            )
        if self.seq_len < 2:
            raise UserError(
                f"--seq-len {self.seq_len} is too small: a row needs at least one token and an EOS (>= 2)."
            )
        if self.seq_len > MAX_INT32:
            raise UserError(
                f"--seq-len {self.seq_len:,} is more than a row can hold: positions and `cu_seqlens` are int32,"
                f" so rows hold at most {MAX_INT32:,} tokens. Pass a smaller --seq-len."
            )
        if self.strategy not in STRATEGIES:
            raise UserError(
                f"--strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}."
            )
        if self.long_docs not in LONG_DOC_POLICIES:
            raise UserError(
                f"--long-docs {self.long_docs!r} is unknown; choose one of {', '.join(LONG_DOC_POLICIES)}."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction} must be in [0, 1).")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers {self.workers} must be at least 1.")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            raise UserError(f"--rows-per-shard {self.rows_per_shard} must be at least 1.")
        if not self.inputs:
            raise UserError(
                "no inputs given; pass one or more files, folders or globs, or a mixture with --recipe or --source."
            )
        if self.dataset_split is not None and not self.dataset_split.strip():
            raise UserError("--dataset-split is empty; name a split of the DatasetDict input, or drop it.")


def check_card_fields(cfg: PackConfig) -> None:
    """The card flags checked as :func:`prep.card.check_card_info` checks them; one given both as a flag and
    in the recipe's ``[card]`` table is refused, since neither could win without hiding the other."""
    check_card_info(flag_card_info(cfg))
    recipe = cfg.mixture.card if cfg.mixture is not None else None
    if recipe is None:
        return
    for key in CARD_KEYS:
        flag = CARD_FLAGS[key]
        if getattr(cfg, key) and getattr(recipe, key):
            raise UserError(
                f"{flag} {_shown(getattr(cfg, key))} is given and {cfg.mixture.where} sets `card.{key}`"
                f" {_shown(getattr(recipe, key))}; keep one: drop {flag}, or the key from the recipe."
            )


def _shown(value: str | tuple[str, ...]) -> str:
    return repr(value) if isinstance(value, str) else repr(list(value))


def flag_card_info(cfg: PackConfig) -> CardInfo:
    return CardInfo(
        license=cfg.license,
        language=tuple(cfg.language),
        source_datasets=tuple(cfg.source_datasets),
        description=cfg.description,
    )


def card_info(cfg: PackConfig) -> CardInfo | None:
    """What the manifest records for the card: the flags, and the recipe's ``[card]`` keys (never the same key
    twice, :func:`check_card_fields`); None when neither gave any."""
    flags = flag_card_info(cfg)
    recipe = cfg.mixture.card if cfg.mixture is not None else None
    info = (
        flags
        if recipe is None
        else CardInfo(
            license=flags.license or recipe.license,
            language=flags.language or recipe.language,
            source_datasets=flags.source_datasets or recipe.source_datasets,
            description=flags.description or recipe.description,
        )
    )
    return None if info == CardInfo() else info


def check_chat_options(cfg: PackConfig) -> None:
    """Refuse chat options that cannot work, with the fix."""
    if cfg.format not in FORMATS:
        raise UserError(f"--format {cfg.format!r} is unknown; choose one of {', '.join(FORMATS)}.")
    if cfg.long_chats not in LONG_CHAT_RULES:
        raise UserError(
            f"--long-chats {cfg.long_chats!r} is unknown; choose one of {', '.join(LONG_CHAT_RULES)}."
        )
    if not cfg.train_on or not all(r.strip() for r in cfg.train_on):
        raise UserError("--train-on names no role; pass one or more roles, e.g. `--train-on assistant`.")
    if cfg.executor == "ray" and cfg.format not in ("auto", "text"):
        raise UserError(f"--format {cfg.format} needs `--executor local` (the Ray executor packs text only).")


class Progress:
    """What `prep pack` reports while it runs; the CLI draws it, tests ignore it."""

    def start(self, phase: str, total: float | None) -> None: ...

    def advance(self, amount: float, **fields: int) -> None: ...

    def message(self, text: str) -> None: ...


# --- read -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadBatch:
    """One job of records, and where it sits: the read stage's record, the encode stage's input."""

    source_index: int
    """Index of the input file in the run's list."""
    last: bool
    """Whether it is the last batch of its input file (which the journal then closes)."""
    job: Job
    """What the encoder tokenizes; ``job.records`` is set once it is encoded."""
    fingerprint: Fingerprint | None = None
    """The input's fingerprint, on its last batch (it is read whole by then)."""


@dataclass(frozen=True, slots=True)
class RecordKinds:
    """What each input's records hold (prep/chat_pack.py), and how conversations become ids and targets."""

    kinds: tuple[str, ...]
    spec: ChatSpec

    @property
    def masked(self) -> bool:
        """Whether the pack's labels follow a target mask (any input holds conversations or pairs)."""
        return any(k != "text" for k in self.kinds)


def record_kinds(cfg: PackConfig, sources: list[InputFile]) -> RecordKinds | None:
    """What each input holds under ``--format``, with the chat template if any holds conversations; ``None``
    when every input holds text (a plain pack, unchanged)."""
    kinds = resolve_kinds(cfg.format, cfg.text_field, sources)
    if all(k == "text" for k in kinds):
        return None
    if cfg.strategy != "bfd":
        raise UserError(
            f"--strategy {cfg.strategy} cuts documents across rows; conversations are never cut. Pass"
            " `--strategy bfd` (the default) to pack conversations and pairs."
        )
    if "text" in kinds and cfg.long_docs == "split":
        raise UserError(
            "a pack holding conversations never splits a document across rows, and some inputs hold text"
            " documents: pass `--long-docs truncate` or `--long-docs drop` for those longer than --seq-len."
        )
    template = load_chat_template(cfg.tokenizer, cfg.chat_template) if "chat" in kinds else None
    max_tokens = cfg.seq_len - 1 - (cfg.bos_token is not None)
    return RecordKinds(kinds, ChatSpec(template, frozenset(cfg.train_on), cfg.long_chats, max_tokens))


def read(
    cfg: PackConfig,
    sources: list[InputFile],
    start: tuple[int, int],
    progress: Progress,
    chat: RecordKinds | None = None,
) -> Iterator[ReadBatch]:
    """The inputs as batches, from ``start`` = (source index, records of it done) on: the journal's position.

    With ``chat``, inputs of conversations or pairs come as :class:`ChatJob`s."""
    spread = cfg.workers or os.cpu_count() or 1
    for index in range(start[0], len(sources)):
        skip = start[1] if index == start[0] else 0
        kind = chat.kinds[index] if chat is not None else "text"
        digest = InputDigest()  # a resumed input is read from its start too: the skipped records are hashed
        field = sources[index].text_field or cfg.text_field
        jobs = source_jobs(
            sources[index],
            text_field=record_field(kind, field) if kind != "text" else field,
            val_fraction=cfg.val_fraction,
            hashes=cfg.mixture is not None,
            skip=skip,
            spread=spread,
            on_bytes=progress.advance,
            digest=digest,
        )
        if chat is not None and kind != "text":
            jobs = (ChatJob(job, kind, chat.spec) for job in jobs)  # type: ignore[arg-type]
        held = None  # one batch held back, to know which is the last of its source
        for job in jobs:
            if held is not None:
                yield ReadBatch(index, False, held)
            held = job
        last = empty_job(cfg.val_fraction, cfg.mixture is not None) if held is None else held
        yield ReadBatch(index, True, last, digest.fingerprint(sources[index].path))


def encode(encoder: Encoder, batches: Iterable[ReadBatch]) -> Iterator[tuple[ReadBatch, EncodedBatch]]:
    """Each batch with its ids, in order; the encoder works a few batches ahead on other cores."""
    return encoder.map((batch, batch.job) for batch in batches)


# --- frame ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Framed:
    """One batch's documents as token streams (BOS? + ids + EOS each), with what the journal records of them."""

    num_records: int
    """Records of the batch, packed or not: the next batch's first doc id is this many further."""
    tokens: np.ndarray
    """int32, the kept documents' streams back to back."""
    doc_id: np.ndarray
    """int64, each kept document's index among all input records."""
    doc_len: np.ndarray
    """int64, each kept document's stream length."""
    is_val: np.ndarray
    """int8, 1 for each kept document of the ``val`` split."""
    doc_hash: np.ndarray | None = None
    """uint64, each kept document's content hash, for a mixture (else None)."""
    mask: np.ndarray | None = None
    """uint8 per token, 1 where it is a target: only in a pack of conversations or pairs (prep/chat_pack.py)."""


def frame(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    records: BatchRecords,
    ids: EncodedBatch,
    first_id: int,
    counts: dict[str, int],
) -> Framed:
    """One encoded batch as streams under ``--long-docs``; its records are counted into ``counts``.

    ``first_id``: the doc id of the batch's first record. Both executors call this.
    """
    _count_problems(cfg, records, counts)
    streams = build_streams(
        ids, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=cfg.seq_len, long_docs=cfg.long_docs
    )
    for key, value in streams.counts.items():
        counts[key] += value
    return Framed(
        num_records=records.num_records,
        tokens=streams.tokens,
        doc_id=first_id + records.text_index()[streams.kept],
        doc_len=streams.doc_len,
        is_val=records.is_val[streams.kept],
        doc_hash=None if records.doc_hash is None else records.doc_hash[streams.kept],
    )


def frame_masked(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    records: BatchRecords,
    encoded: EncodedBatch | ChatBatch,
    kind: str,
    first_id: int,
    counts: dict[str, int],
) -> Framed:
    """:func:`frame` for a pack whose labels follow a target mask: documents (``kind`` text) are targets
    throughout; conversations and pairs, fitted to a row when encoded, carry their own mask."""
    if not isinstance(encoded, ChatBatch):
        framed = frame(cfg, tok, records, encoded, first_id, counts)
        mask = np.ones(len(framed.tokens), np.uint8)
        return dataclasses.replace(framed, mask=mask)
    _count_problems(cfg, records, counts)
    _refuse_placed_ids_inside(encoded, tok)
    extra = 1 + (tok.bos_id is not None)
    kept = encoded.fate != DROPPED
    out_len = encoded.lengths[kept] + extra
    ends = np.cumsum(out_len)
    starts = ends - out_len
    tokens = np.empty(int(out_len.sum()), np.int32)
    mask = np.zeros(len(tokens), np.uint8)
    is_content = np.ones(len(tokens), bool)
    if tok.bos_id is not None:
        tokens[starts] = tok.bos_id
        is_content[starts] = False
    tokens[ends - 1] = tok.eos_id
    is_content[ends - 1] = False
    tokens[is_content] = encoded.ids
    mask[is_content] = encoded.targets
    mask[ends - 1] = kind == "prompt-completion"  # a pair's EOS ends its completion; a chat's turn end did
    truncated, dropped = encoded.fate == TRUNCATED, encoded.fate == DROPPED
    full = encoded.full_lengths + extra
    for key, value in {
        "tokens_in": full.sum(),
        "packed": kept.sum(),
        "tokens_packed": out_len.sum(),
        "truncated": truncated.sum(),
        "tokens_truncated": (encoded.full_lengths - encoded.lengths)[truncated].sum(),
        "dropped": dropped.sum(),
        "tokens_dropped": full[dropped].sum(),
    }.items():
        counts[key] += int(value)
    return Framed(
        num_records=records.num_records,
        tokens=tokens,
        doc_id=first_id + records.text_index()[kept],
        doc_len=out_len.astype(np.int64),
        is_val=records.is_val[kept],
        doc_hash=None if records.doc_hash is None else records.doc_hash[kept],
        mask=mask,
    )


def _refuse_placed_ids_inside(encoded: ChatBatch, tok: LoadedTokenizer) -> None:
    """A chat template that writes the pack's EOS (or BOS) inside a conversation would give it two."""
    for flag, name, token_id in (
        ("--eos-token", tok.info.eos_token, tok.eos_id),
        ("--bos-token", tok.info.bos_token, tok.bos_id),
    ):
        if token_id is not None and (encoded.ids == token_id).any():
            raise UserError(
                f"the chat template writes {name!r} (id {token_id}) inside conversations, and it is the pack's"
                f" {flag[2:5].upper()}: a conversation would hold two. Pass another {flag} (for Qwen,"
                " `--eos-token '<|endoftext|>'`), one the template does not write."
            )


def _count_problems(cfg: PackConfig, records: BatchRecords, counts: dict[str, int]) -> None:
    """Count the records without text, or stop at the first invalid one unless --skip-invalid."""
    skip_key = {EMPTY: "skipped_empty", MISSING_FIELD: "skipped_missing_field"}
    counts["docs_in"] += records.num_records
    for _, record in records.problems:
        if record.problem != EMPTY and not cfg.skip_invalid:
            # A pipe's first line unreadable: most often not JSON lines at all (a CSV, a tar), not one bad record.
            piped = record.where == "<stdin>:1"
            raise InputError(
                f"{record.where}: {record.detail or record.problem}. Fix the record, or pass"
                " `--skip-invalid` to count and skip such records."
                + (
                    " Standard input (`-`) is read as JSON lines (gzip, bzip2, xz or zstd compressed, or plain);"
                    " save another format to a file and name that."
                    if piped
                    else ""
                )
            )
        counts[skip_key.get(record.problem, "skipped_invalid")] += 1


def require_documents(docs: DocumentAccounting) -> None:
    """Refuse a corpus in which no document survived reading and the long-document policy."""
    if docs.packed == 0:
        raise InputError(
            f"no documents to pack: {docs.docs_in:,} records read, {docs.skipped:,} skipped"
            f" (empty {docs.skipped_empty:,}, missing field {docs.skipped_missing_field:,}, invalid {docs.skipped_invalid:,}),"
            f" {docs.dropped:,} dropped as longer than --seq-len. Check the inputs and `--text-field`."
        )


# --- journal ----------------------------------------------------------------------------------------------


def fingerprint(cfg: PackConfig, tok: LoadedTokenizer, sources: list[InputFile], rows_per_shard: int) -> dict:
    """Everything that shapes the output bytes: `--resume` continues a run only if all of it still matches."""
    return {
        "inputs": list(cfg.inputs),
        "input_files": input_stats([s.location for s in sources]),
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": tok.info.sha256,
        "seq_len": cfg.seq_len,
        "strategy": cfg.strategy,
        "text_field": cfg.text_field,
        "dataset_split": cfg.dataset_split,
        "eos_token": tok.info.eos_token,
        "bos_token": tok.info.bos_token,
        "long_docs": cfg.long_docs,
        "val_fraction": cfg.val_fraction,
        "skip_invalid": cfg.skip_invalid,
        "rows_per_shard": rows_per_shard,
        "format": cfg.format,
        "chat_template": cfg.chat_template,
        "train_on": list(cfg.train_on),
        "long_chats": cfg.long_chats,
        **(cfg.mixture.fingerprint() if cfg.mixture is not None else {}),
    }


def input_info(
    source: InputFile,
    first_doc_id: int,
    num_records: int,
    fingerprint: Fingerprint,
    *,
    num_docs: int,
    num_tokens: int,
    record_format: str | None = None,
) -> InputInfo:
    """What the manifest records of one input read whole (both executors make it here): ``num_docs`` and
    ``num_tokens`` are what it gave after reading and ``--long-docs``; ``record_format``: ``chat`` or
    ``prompt-completion`` when its records held those."""
    return InputInfo(
        path=source.name,
        format=source.format,
        first_doc_id=first_doc_id,
        num_records=num_records,
        dataset_split=source.dataset_split,
        source=source.source,
        num_docs=num_docs,
        num_tokens=num_tokens,
        num_bytes=fingerprint.num_bytes,
        mtime_ns=fingerprint.mtime_ns,
        sha256=fingerprint.sha256,
        record_format=record_format,
    )


def journal_batch(
    journal: Journal,
    tokens: BinaryIO,
    framed: Framed,
    source: InputFile | None,
    fingerprint: Fingerprint | None = None,
    kind: str = "text",
) -> None:
    """Append one framed batch to the work files and commit it; ``source``: the input file it closes, if any,
    with its ``fingerprint`` (``kind``: what its records hold)."""
    state = journal.pass1
    hashes = {} if framed.doc_hash is None else {"doc_hash": framed.doc_hash}
    journal.append_docs(doc_id=framed.doc_id, doc_len=framed.doc_len, is_val=framed.is_val, **hashes)
    if framed.mask is not None:
        journal.append_targets(framed.mask)
    tokens.write(memoryview(framed.tokens))
    state.next_id += framed.num_records
    journal.commit_batch(tokens, framed.num_records)
    if source is not None:
        assert fingerprint is not None, source
        # What this file gave: the counts so far less those of the files before it (a resume-safe sum).
        info = input_info(
            source,
            state.first_id,
            state.next_id - state.first_id,
            fingerprint,
            num_docs=state.counts["packed"] - sum(i.num_docs or 0 for i in state.inputs),
            num_tokens=state.counts["tokens_packed"] - sum(i.num_tokens or 0 for i in state.inputs),
            record_format=None if kind == "text" else kind,
        )
        journal.commit_source(tokens, info)


# --- plan -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """The row plan of one split (``train`` or ``val``) over its own documents."""

    name: str
    docs: np.ndarray | slice
    """Indices of the split's documents among all; ``slice(None)`` when it holds every one (no copy)."""
    rows: RowPlan
    """Its ``seg_doc`` indexes the split's documents (``docs``), not all of them."""
    copy: np.ndarray | None = None
    """A mixture's copy number of each of ``docs`` (which then may repeat); None without a mixture."""


def mix(
    cfg: PackConfig,
    doc_len: np.ndarray,
    val: np.ndarray | None,
    doc_hash: np.ndarray,
    doc_id: np.ndarray,
    inputs: tuple[InputInfo, ...],
    sources: list[InputFile],
) -> Selection:
    """The mixture's documents per split: a pure function of pass 1's per-document arrays (prep/mixture.py)."""
    assert cfg.mixture is not None
    index = {s.name: i for i, s in enumerate(cfg.mixture.sources)}
    file_source = [index[s.source] for s in sources if s.source is not None]
    first_ids = [i.first_doc_id for i in inputs]
    sources_of = doc_sources(doc_id, first_ids, file_source)
    return select(cfg.mixture, cfg.text_field, doc_len, val, doc_hash, sources_of, cfg.val_fraction)


def plan(
    cfg: PackConfig,
    doc_len: np.ndarray,
    val: np.ndarray | None,
    progress: Progress,
    selection: Selection | None = None,
    whole_docs: bool = False,
) -> Iterator[SplitPlan]:
    """The plan of each split written, one at a time; a global plan over every document of the split.

    ``val``: each document's val flag (``None``: none is). ``selection``: a mixture's documents per split.
    ``whole_docs``: never cut a document across rows (a pack of conversations: a conversation is one segment,
    its turns attend to each other).
    """
    for name in SPLITS:
        if name == "val" and cfg.val_fraction == 0.0:
            continue
        copy = None
        if selection is not None:
            docs, copy = selection.splits[name].docs, selection.splits[name].copy
        else:
            docs = slice(None) if val is None else _members(val, name == "val")
        progress.start(f"pack {name}", None)
        # The split's documents (copies included) and tokens, not the reading's counts, on its log lines.
        lengths = doc_len[docs]
        progress.advance(0, docs=len(lengths), tokens=int(lengths.sum(dtype=np.int64)))
        del lengths
        # Not bound to a name here: the caller may drop the split-local plan while this generator waits.
        yield SplitPlan(
            name,
            docs,
            make_plan(
                cfg.strategy,
                doc_len[docs],
                cfg.seq_len,
                allow_fragments=cfg.long_docs == "split" and not whole_docs,
            ),
            copy,
        )


def _members(val: np.ndarray, flag: bool) -> np.ndarray:
    """Indices of the documents whose val flag is ``flag``, in the narrowest type, a block at a time."""
    dtype = index_dtype(len(val))
    parts = [
        (np.flatnonzero(val[lo : lo + READ_BLOCK].astype(bool) == flag) + lo).astype(dtype)
        for lo in range(0, len(val), READ_BLOCK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


# --- write ------------------------------------------------------------------------------------------------


def split_metadata(cfg: PackConfig, tok: LoadedTokenizer, split: str) -> dict:
    """The Arrow schema metadata of every shard of ``split``."""
    return shard_metadata(
        split=split,
        seq_len=cfg.seq_len,
        strategy=cfg.strategy,
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        tokenizer_sha256=tok.info.sha256,
        vocab_size=tok.info.vocab_size,
    )


# --- finish -----------------------------------------------------------------------------------------------


def chat_options(cfg: PackConfig, chat: RecordKinds | None) -> dict:
    """What the manifest's options say of a pack with a target mask; nothing for a plain pack."""
    if chat is None or not chat.masked:
        return {}
    has_chat = "chat" in chat.kinds
    return {
        "format": pack_format(chat.kinds),
        "train_on": ",".join(cfg.train_on) if has_chat else None,
        "long_chats": cfg.long_chats,
        "chat_template": None if chat.spec.template is None else chat.spec.template.origin,
    }


def finish(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    inputs: tuple[InputInfo, ...],
    docs: DocumentAccounting,
    splits: dict[str, SplitInfo],
    ignored: tuple[IgnoredInput, ...] = (),
    mixture: MixtureInfo | None = None,
    chat: RecordKinds | None = None,
) -> Manifest:
    """After every shard is durable: write the manifest (it marks a complete dataset), then the card, then drop
    the work folder, so that a run stopped before the card leaves a dataset that `--resume` completes."""
    manifest = Manifest(
        tokenizer=tok.info,
        options=PackOptions(
            seq_len=cfg.seq_len,
            strategy=cfg.strategy,
            text_field=cfg.text_field,
            long_docs=cfg.long_docs,
            val_fraction=cfg.val_fraction,
            skip_invalid=cfg.skip_invalid,
            dataset_split=cfg.dataset_split,
            **chat_options(cfg, chat),
        ),
        inputs=inputs,
        documents=docs,
        splits=splits,
        created_by=f"prep {__version__}",
        ignored=ignored,
        card=card_info(cfg),
        mixture=mixture,
    )
    problems = docs.problems() + [p for s in (mixture.sources if mixture else ()) for p in s.problems()]
    assert not problems, f"internal accounting error: {problems}"
    kill_point("manifest")
    manifest.save(cfg.out)
    kill_point("card")
    try:
        write_card(cfg.out, manifest)
    except OSError:  # the dataset is complete: free the work folder's space; `prep card` writes the card
        shutil.rmtree(cfg.out / WORK_DIR, ignore_errors=True)
        raise
    shutil.rmtree(cfg.out / WORK_DIR, ignore_errors=True)
    return manifest
