"""`prep pack --executor local`: the stages of prep/stages.py in three passes on this machine, with a journal.

1. read -> encode -> frame -> journal: stream the inputs in batches (the encoder works a few ahead on
   every core) and commit each batch's token streams and per-document arrays to ``OUT/.pack-work``.
   Memory holds a few batches.
2. plan: each split from the document lengths alone, read back in the narrowest integer type that
   holds them.
3. write -> finish: gather rows from the memory-mapped token store into shards; the manifest last, then
   the card.

A killed run continues with ``--resume`` from the journal's last commit (prep/journal.py).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.chat import check_tokenizer_for_chat
from prep.discovery import Discovery
from prep.encoder import Encoder, open_encoder
from prep.fast_bpe import EncodedBatch
from prep.faults import ResumableError, output_error
from prep.journal import DOC_ARRAYS, Journal
from prep.mixture import EmptySourceError
from prep.outdir import WORK_DIR, prepare_output_folder
from prep.packing import RowPlan, index_dtype
from prep.provenance import is_stdin
from prep.readers import InputFile
from prep.recipe import RecipeError
from prep.stages import (
    READ_BLOCK,
    PackConfig,
    Progress,
    ReadBatch,
    RecordKinds,
    encode,
    fingerprint,
    finish,
    frame,
    frame_masked,
    journal_batch,
    mix,
    plan,
    read,
    record_kinds,
    require_documents,
    split_metadata,
)
from prep.tokenizer import LoadedTokenizer
from prep.writer import TokenStore, default_rows_per_shard, write_split
from shared.errors import UserError
from shared.manifest import DocumentAccounting, InputInfo, Manifest, MixtureInfo, SplitInfo


@dataclass(frozen=True, slots=True)
class Tokenized:
    """What pass 1 leaves for the next passes, besides the journal's files."""

    num_docs: int
    """Packed documents, whose length, id and split are in the journal's per-document files."""
    accounting: DocumentAccounting
    inputs: tuple[InputInfo, ...]


def pack_local(cfg: PackConfig, found: Discovery, progress: Progress) -> Manifest:
    """`prep pack` on this machine (the caller holds the output folder's lock)."""
    chat = record_kinds(cfg, list(found.files))
    with open_encoder(
        cfg.tokenizer,
        eos_token=cfg.eos_token,
        bos_token=cfg.bos_token,
        workers=cfg.workers,
        notice=progress.message,
        use_fast=chat is None or "text" in chat.kinds,  # conversations are rendered with `tokenizers`
    ) as encoder:
        try:
            return _pack(cfg, found, encoder, progress, chat)
        except OSError as e:  # a full disk, an --out that cannot be written: say so, keep the work
            error = output_error(e, cfg.out, cfg.out / WORK_DIR)
            if error is None:
                raise
            raise error from e


def _pack(
    cfg: PackConfig, found: Discovery, encoder: Encoder, progress: Progress, chat: RecordKinds | None
) -> Manifest:
    sources = list(found.files)
    # Standard input's size is not known ahead: then the progress has no total.
    total = None if any(is_stdin(s.path) for s in sources) else float(sum(s.num_bytes for s in sources))
    progress.start("tokenize", total)
    # A new run starts at the first record: hand the workers their first jobs now, while the tokenizer's
    # details (EOS, BOS: for the journal and the streams) are still being resolved. A resumed run first
    # reads where to start from the journal, which needs them.
    encoded = None if cfg.resume else encode(encoder, read(cfg, sources, (0, 0), progress, chat))
    tok = encoder.tok
    if chat is not None and "chat" in chat.kinds:
        check_tokenizer_for_chat(tok.tokenizer)
    if cfg.workers is not None:
        # The Rust thread pool reads this once, on first use; later calls in the same process keep it.
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.workers))
    prepare_output_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    rows_per_shard = cfg.rows_per_shard or default_rows_per_shard(cfg.seq_len)
    zero_counts = dict.fromkeys(DocumentAccounting.__dataclass_fields__, 0)
    journal = Journal.start(
        cfg.out / WORK_DIR,
        fingerprint(cfg, tok, sources, rows_per_shard),
        zero_counts,
        resume=cfg.resume,
        hashes=cfg.mixture is not None,
    )
    try:
        if encoded is None:
            start = (journal.pass1.source_index, journal.pass1.records_done)
            encoded = encode(encoder, read(cfg, sources, start, progress, chat))
        tokenized = _tokenize(cfg, tok, sources, journal, progress, encoded, chat)
        require_documents(tokenized.accounting)
    except UserError as e:
        # A bad record or an empty corpus is a mistake to fix, not a crash: leave --out as it was so that the
        # corrected command simply runs again. A resumed run keeps its work for the next `--resume`.
        if not cfg.resume and not isinstance(e, ResumableError):
            journal.discard()
        raise
    docs = tokenized.accounting
    try:
        splits, mixture = _plan_and_write(
            cfg, tok, journal, tokenized, sources, rows_per_shard, progress, chat is not None
        )
    except EmptySourceError:  # fixed by other inputs: what was tokenized cannot serve the fixed command
        if not cfg.resume:
            journal.discard()
        raise
    except RecipeError as e:  # a share the data cannot give: keep the tokenized work for the fixed recipe
        raise RecipeError(
            f"{e} The tokenized inputs are kept in `{cfg.out}`: fix the recipe (or the --source options) and"
            " run the same command with `--resume` to mix them without tokenizing again."
        ) from None
    return finish(cfg, tok, tokenized.inputs, docs, splits, found.ignored, mixture, chat)


def _tokenize(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    sources: list[InputFile],
    journal: Journal,
    progress: Progress,
    encoded: Iterator[tuple[ReadBatch, EncodedBatch]],
    chat: RecordKinds | None = None,
) -> Tokenized:
    """Pass 1: frame and journal every encoded batch, in input order, from where the journal left off."""
    state = journal.pass1
    with journal.open_tokens() as out:
        for batch, ids in encoded:
            source = sources[batch.source_index] if batch.last else None
            if chat is None:
                framed = frame(cfg, tok, batch.job.records, ids, state.next_id, state.counts)
                journal_batch(journal, out, framed, source, batch.fingerprint)
            else:
                kind = chat.kinds[batch.source_index]
                framed = frame_masked(cfg, tok, batch.job.records, ids, kind, state.next_id, state.counts)
                journal_batch(journal, out, framed, source, batch.fingerprint, kind)
            progress.advance(0, docs=state.counts["docs_in"], tokens=state.counts["tokens_packed"])
    journal.finish_pass1()
    return Tokenized(state.num_docs, DocumentAccounting(**state.counts), tuple(state.inputs))


def _plan_and_write(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    journal: Journal,
    tokenized: Tokenized,
    sources: list[InputFile],
    rows_per_shard: int,
    progress: Progress,
    masked: bool = False,
) -> tuple[dict[str, SplitInfo], MixtureInfo | None]:
    """Passes 2 and 3: plan and write every split from the journal's files; returns what the manifest records.

    Every per-document array is dropped on return, before the card reads the shards back.
    """
    num_docs, num_tokens = tokenized.num_docs, tokenized.accounting.tokens_packed
    # Lengths and offsets are below the token count: int32 up to 2**31 tokens.
    doc_len = _read_file(
        journal.doc_path("doc_len"), DOC_ARRAYS["doc_len"], num_docs, index_dtype(num_tokens)
    )
    val = _read_file(journal.doc_path("is_val"), DOC_ARRAYS["is_val"], num_docs) if cfg.val_fraction else None
    # Ids are read a row block at a time, from the file (its pages released like the tokens').
    doc_id = np.memmap(journal.doc_path("doc_id"), dtype=DOC_ARRAYS["doc_id"], mode="r", shape=(num_docs,))
    tokens = np.memmap(journal.tokens_path, dtype=np.int32, mode="r") if num_tokens else np.zeros(0, np.int32)
    targets = None
    if masked:
        targets = np.memmap(journal.targets_path, np.uint8, "r") if num_tokens else np.zeros(0, np.uint8)
    selection = None
    if cfg.mixture is not None:
        doc_hash = _read_file(journal.doc_path("doc_hash"), journal.arrays["doc_hash"], num_docs)
        selection = mix(cfg, doc_len, val, doc_hash, np.asarray(doc_id), tokenized.inputs, sources)
        del doc_hash
    doc_offset = None
    splits = {}
    for split in plan(cfg, doc_len, val, progress, selection, whole_docs=masked):
        name, rows = split.name, split.rows
        if doc_offset is None:
            doc_offset = np.zeros(num_docs, doc_len.dtype)
            np.cumsum(doc_len[:-1], dtype=doc_len.dtype, out=doc_offset[1:])
        if split.copy is not None:  # a mixture's documents may repeat: a store of the split's own
            copies = split.copy * tokenized.accounting.docs_in
            store = TokenStore(
                tokens, doc_offset[split.docs], doc_len[split.docs], doc_id[split.docs] + copies, targets
            )
        else:
            if not isinstance(split.docs, slice):  # the plan indexes the split's documents: make it index all
                rows = RowPlan(split.docs[rows.seg_doc], rows.seg_start, rows.seg_len, rows.row_ptr)
            store = TokenStore(
                tokens=tokens, doc_offset=doc_offset, doc_len=doc_len, doc_id=doc_id, targets=targets
            )
        del split  # its document indices and split-local plan, before the shards are written
        progress.start(f"write {name}", float(rows.num_rows))
        splits[name] = write_split(
            store,
            rows,
            split=name,
            out_dir=cfg.out,
            metadata=split_metadata(cfg, tok, name),
            rows_per_shard=rows_per_shard,
            on_rows=lambda n: (
                progress.advance(n),
                _release_pages(tokens),
                _release_pages(doc_id),
                targets is not None and _release_pages(targets),
            ),
            reuse=lambda file, split=name: journal.reusable_shard(split, file),
            on_shard=lambda info, split=name: journal.shard_done(split, info),
        )
        del rows, store  # before the next split is planned
    return splits, None if selection is None else selection.info


def _read_file(path: Path, dtype: np.dtype, count: int, into: np.dtype | None = None) -> np.ndarray:
    """``count`` entries of ``dtype`` from ``path`` as an array of ``into`` (a narrower type that holds them),
    read a block at a time so that the wider copy is never whole in memory."""
    out = np.empty(count, into or dtype)
    with open(path, "rb") as f:
        for lo in range(0, count, READ_BLOCK):
            block = np.fromfile(f, dtype=dtype, count=min(READ_BLOCK, count - lo))
            if len(block) != min(READ_BLOCK, count - lo):
                raise UserError(
                    f"`{path}` is shorter than its journal says; pass `--overwrite` to start again."
                )
            out[lo : lo + len(block)] = block
    return out


def _release_pages(array: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped work file read so far: they stay in the page cache, but no longer
    count in this process's resident memory, which therefore stays flat however large the corpus (bfd
    gathers rows from all over the token store, so without this every page of it ends up resident)."""
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
