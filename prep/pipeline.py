"""`prep pack` as a library call: read, tokenize, pack and write a dataset folder from a :class:`PackConfig`.

Three passes, each bounded in memory:

1. Stream the inputs in batches, tokenize, apply the long-document policy, and append each document's
   token stream (BOS, ids, EOS) to ``.pack-work/tokens.bin`` and its length, id and split to the
   per-document files beside it. Memory holds one batch.
2. Plan each split (``bfd`` or ``wrapped``) from the document lengths alone, read back in the narrowest
   integer type that holds them.
3. Gather rows from the memory-mapped token store into shards; write the manifest last, then the card.

What grows with the corpus is a few arrays of one entry per document (or segment) in planning and
writing: in int32 below 2**31 tokens, about 40 bytes per document at the peak of planning (see
docs/reliability.md, "Memory: bytes per document").
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from prep import __version__
from prep.card import write_card
from prep.discovery import Discovery, describe, discover_inputs
from prep.engine import Job, JsonlChunk, TokenEngine, build_fast, start_reference
from prep.fast_bpe import EncodedBatch
from prep.faults import ResumableError, output_error
from prep.journal import DOC_ARRAYS, Journal, input_stats, kill_point
from prep.outdir import WORK_DIR, output_lock, prepare_output_folder, refuse_overlap
from prep.packing import STRATEGIES, PackPlan, index_dtype, make_plan
from prep.readers import (
    EMPTY,
    MISSING_FIELD,
    BatchRecords,
    InputError,
    InputFile,
    Record,
    read_jsonl_chunks,
    read_records,
    summarize,
)
from prep.streams import BatchStreams, build_streams
from prep.tokenizer import LoadedTokenizer, load_tokenizer
from prep.writer import TokenStore, default_rows_per_shard, write_split
from shared.contract import SPLITS, shard_metadata
from shared.errors import UserError
from shared.manifest import (
    MAX_INT32,
    DocumentAccounting,
    IgnoredInput,
    InputInfo,
    Manifest,
    PackOptions,
    SplitInfo,
)

LONG_DOC_POLICIES = ("split", "truncate", "drop")
ENGINES = ("local", "ray")
BATCH_CHARS = 4 << 20
"""Characters of text tokenized per batch: large enough to keep every core busy, small enough to bound memory."""


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
    """What to do with a document longer than ``seq_len``: split it into fragments, truncate it, or drop it."""
    val_fraction: float = 0.0
    """Share of documents (chosen by a hash of their text) written to the ``val`` split."""
    workers: int | None = None
    """Threads for tokenization; default every core."""
    rows_per_shard: int | None = None
    skip_invalid: bool = False
    """Count and skip malformed records instead of stopping at the first one."""
    overwrite: bool = False
    resume: bool = False
    """Continue the interrupted run in ``out`` from its journal (same options and inputs required)."""
    engine: str = "local"
    """``local`` (every core of this machine) or ``ray`` (Ray tasks across a cluster; same output bytes)."""
    ray_address: str | None = None
    """Ray cluster to join with ``engine="ray"``; default ``RAY_ADDRESS``, else a Ray started on this machine."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine!r} is unknown; choose one of {', '.join(ENGINES)}.")
        if self.ray_address is not None and self.engine != "ray":
            raise UserError(
                f"--ray-address {self.ray_address!r} needs `--engine ray`; add it, or drop the address."
            )
        if self.resume and self.engine == "ray":
            raise UserError(
                "`--resume` is not supported with `--engine ray` (a Ray pack keeps no journal); pass"
                " `--overwrite` to pack again from the start, or finish the run with `--engine local`."
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
            raise UserError("no inputs given; pass one or more files, folders or globs.")
        if self.dataset_split is not None and not self.dataset_split.strip():
            raise UserError("--dataset-split is empty; name a split of the DatasetDict input, or drop it.")


class Progress:
    """What the pipeline reports while it runs; the CLI draws it, tests ignore it."""

    def start(self, phase: str, total: float | None) -> None: ...

    def advance(self, amount: float, **fields: int) -> None: ...

    def message(self, text: str) -> None: ...


def _batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    """``records`` in batches of about ``BATCH_CHARS`` characters of text."""
    batch: list[Record] = []
    total = 0
    for record in records:
        batch.append(record)
        total += len(record.text) if record.text else 0
        if total >= BATCH_CHARS:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


@dataclass(slots=True)
class _Tokenized:
    num_docs: int
    """Packed documents, whose length, id and split are in the journal's per-document files."""
    accounting: DocumentAccounting
    inputs: tuple[InputInfo, ...]


def _jobs(
    cfg: PackConfig, sources: list[InputFile], start: tuple[int, int], progress: Progress
) -> Iterator[tuple[tuple[int, BatchRecords | JsonlChunk, bool], Job]]:
    """``((source index, its records, last batch of the source?), job)`` from ``start`` on.

    ``start``: (source index, records of it done), the journal's position.

    JSONL inputs go to the engine as chunks of whole lines (:class:`JsonlChunk`: its workers decode them,
    and the engine fills in their records); other inputs as records read here, and their texts.
    """
    for index in range(start[0], len(sources)):
        source = sources[index]
        skip = start[1] if index == start[0] else 0
        # (what the pipeline keeps of a batch, what the engine tokenizes); a JSONL chunk is both
        jobs: Iterator[tuple[BatchRecords | JsonlChunk, Job]]
        if source.format == "jsonl":
            chunks = read_jsonl_chunks(
                source,
                progress.advance,
                size=BATCH_CHARS,
                skip=skip,
                spread=cfg.workers or os.cpu_count() or 1,
            )
            name = str(source.path)
            jobs = ((c, c) for c in (JsonlChunk(name, cfg.text_field, cfg.val_fraction, *x) for x in chunks))
        else:
            records = read_records(source, cfg.text_field, lambda n: progress.advance(n))
            jobs = (
                (summarize(batch, cfg.val_fraction), [r.text for r in batch if r.text is not None])
                for batch in _batches(islice(records, skip, None))
            )
        done = None
        for upcoming in jobs:
            if done is not None:
                yield (index, done[0], False), done[1]
            done = upcoming
        if done is None:
            done = (summarize([], cfg.val_fraction), [])
        yield (index, done[0], True), done[1]


def _count_problems(cfg: PackConfig, records: BatchRecords, counts: dict[str, int]) -> None:
    """Count the records without text, or stop at the first invalid one unless --skip-invalid."""
    skip_key = {EMPTY: "skipped_empty", MISSING_FIELD: "skipped_missing_field"}
    counts["docs_in"] += records.num_records
    for _, record in records.problems:
        if record.problem != EMPTY and not cfg.skip_invalid:
            raise InputError(
                f"{record.where}: {record.detail or record.problem}. Fix the record, or pass"
                " `--skip-invalid` to count and skip such records."
            )
        counts[skip_key.get(record.problem, "skipped_invalid")] += 1


def batch_streams(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    records: BatchRecords,
    encoded: EncodedBatch,
    first_id: int,
    counts: dict[str, int],
) -> tuple[BatchStreams, np.ndarray, np.ndarray]:
    """One tokenized batch: count it into ``counts``; return its streams, kept doc ids (int64), val flags (int8).

    ``first_id`` is the doc id of the batch's first record. Both engines call this, so they agree by construction.
    """
    _count_problems(cfg, records, counts)
    streams = build_streams(
        encoded, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=cfg.seq_len, long_docs=cfg.long_docs
    )
    for key, value in streams.counts.items():
        counts[key] += value
    return streams, first_id + records.text_index()[streams.kept], records.is_val[streams.kept]


def _tokenize_inputs(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    sources: list[InputFile],
    journal: Journal,
    progress: Progress,
    encoded_batches: Iterator[tuple[tuple[int, BatchRecords | JsonlChunk, bool], EncodedBatch]],
) -> _Tokenized:
    """Pass 1: every input record to a token stream on disk (or a counted skip), committed batch by batch.

    ``encoded_batches``: the engine's output for :func:`_jobs` from where the journal's last commit left
    off (the beginning, unless resuming). The engine reads a few batches ahead on other cores; commits
    still happen in input order.
    """
    state = journal.pass1
    counts = state.counts
    with journal.open_tokens() as out:
        for (index, records, last), encoded in encoded_batches:
            if isinstance(records, JsonlChunk):
                assert records.records is not None, "the engine decodes every JSONL chunk it tokenizes"
                records = records.records
            streams, doc_ids, flags = batch_streams(cfg, tok, records, encoded, state.next_id, counts)
            journal.append_docs(doc_id=doc_ids, doc_len=streams.doc_len, is_val=flags)
            out.write(memoryview(streams.tokens))
            state.next_id += records.num_records
            journal.commit_batch(out, records.num_records)
            progress.advance(0, docs=counts["docs_in"], tokens=counts["tokens_packed"])
            if last:
                info = InputInfo(
                    path=str(sources[index].path),
                    format=sources[index].format,
                    first_doc_id=state.first_id,
                    num_records=state.next_id - state.first_id,
                    dataset_split=sources[index].dataset_split,
                )
                journal.commit_source(out, info)
    journal.finish_pass1()
    return _Tokenized(state.num_docs, DocumentAccounting(**counts), tuple(state.inputs))


def _fingerprint(
    cfg: PackConfig, tok: LoadedTokenizer, sources: list[InputFile], rows_per_shard: int
) -> dict:
    """Everything that shapes the output bytes: `--resume` continues a run only if all of it still matches."""
    return {
        "inputs": list(cfg.inputs),
        "input_files": input_stats([s.path for s in sources]),
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
    }


def pack(cfg: PackConfig, progress: Progress | None = None) -> Manifest:
    """Pack ``cfg.inputs`` into ``cfg.out``; return the manifest written there."""
    progress = progress or Progress()
    found = discover_inputs(cfg.inputs, cfg.dataset_split)
    refuse_overlap(cfg.out, [Path(i) for i in cfg.inputs if Path(i).exists()] + [s.path for s in found.files])
    progress.message(describe(found))
    with output_lock(cfg.out):
        return _pack_locked(cfg, found, progress)


def _pack_locked(cfg: PackConfig, found: Discovery, progress: Progress) -> Manifest:
    if cfg.engine == "ray":
        from prep.engine_ray import pack_with_ray  # Ray is an optional extra: import it only when asked for

        return pack_with_ray(cfg, found, progress)
    reference = start_reference(
        cfg.tokenizer, eos_token=cfg.eos_token, bos_token=cfg.bos_token, workers=cfg.workers
    )
    try:
        if reference is not None:
            # The reference process loads `tokenizers` on another core while this one builds the fast
            # engine and starts tokenizing; `engine.tok` waits for it.
            engine = TokenEngine(
                workers=cfg.workers,
                notice=progress.message,
                fast=build_fast(cfg.tokenizer),
                reference=reference,
            )
        else:
            tok = load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token, bos_token=cfg.bos_token)
            engine = TokenEngine(tok, workers=cfg.workers, notice=progress.message)
    except BaseException:
        if reference is not None:
            reference.close()
        raise
    with engine:
        try:
            return _pack(cfg, found, engine, progress)
        except OSError as e:  # a full disk, an --out that cannot be written: say so, keep the work
            error = output_error(e, cfg.out, cfg.out / WORK_DIR)
            if error is None:
                raise
            raise error from e


def _pack(cfg: PackConfig, found: Discovery, engine: TokenEngine, progress: Progress) -> Manifest:
    sources = list(found.files)
    progress.start("tokenize", float(sum(s.num_bytes for s in sources)))
    # A new run starts at the first record: hand the workers their first jobs now, while the tokenizer's
    # details (EOS, BOS: for the journal and the streams) are still being resolved. A resumed run first
    # reads where to start from the journal, which needs them.
    encoded = None if cfg.resume else engine.map(_jobs(cfg, sources, (0, 0), progress))
    tok = engine.tok
    if cfg.workers is not None:
        # The Rust thread pool reads this once, on first use; later calls in the same process keep it.
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.workers))
    prepare_output_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    work = cfg.out / WORK_DIR
    rows_per_shard = cfg.rows_per_shard or default_rows_per_shard(cfg.seq_len)
    fingerprint = _fingerprint(cfg, tok, sources, rows_per_shard)
    zero_counts = dict.fromkeys(DocumentAccounting.__dataclass_fields__, 0)
    journal = Journal.start(work, fingerprint, zero_counts, resume=cfg.resume)

    try:
        if encoded is None:
            start = (journal.pass1.source_index, journal.pass1.records_done)
            encoded = engine.map(_jobs(cfg, sources, start, progress))
        tokenized = _tokenize_inputs(cfg, tok, sources, journal, progress, encoded)
        docs = tokenized.accounting
        require_documents(docs)
    except UserError as e:
        # A bad record or an empty corpus is a mistake to fix, not a crash: leave --out as it was so that the
        # corrected command simply runs again. A resumed run keeps its work for the next `--resume`.
        if not cfg.resume and not isinstance(e, ResumableError):
            journal.discard()
        raise
    splits = _write_splits(
        cfg, tok, journal, tokenized.num_docs, docs.tokens_packed, rows_per_shard, progress
    )
    return finish(cfg, tok, tokenized.inputs, docs, splits, found.ignored)


def _write_splits(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    journal: Journal,
    num_docs: int,
    num_tokens: int,
    rows_per_shard: int,
    progress: Progress,
) -> dict[str, SplitInfo]:
    """Passes 2 and 3: plan and write every split from the journal's files; returns what the manifest records.

    Every per-document array is dropped on return, before the card reads the shards back.
    """
    # Lengths and offsets are below the token count: int32 up to 2**31 tokens.
    doc_len = _read_file(
        journal.doc_path("doc_len"), DOC_ARRAYS["doc_len"], num_docs, index_dtype(num_tokens)
    )
    val = _read_file(journal.doc_path("is_val"), DOC_ARRAYS["is_val"], num_docs) if cfg.val_fraction else None
    # Ids are read a row block at a time, from the file (its pages released like the tokens').
    doc_id = np.memmap(journal.doc_path("doc_id"), dtype=DOC_ARRAYS["doc_id"], mode="r", shape=(num_docs,))
    tokens = np.memmap(journal.tokens_path, dtype=np.int32, mode="r") if num_tokens else np.zeros(0, np.int32)
    doc_offset = None
    splits = {}
    for name, idx, plan in plan_splits(cfg, doc_len, val, progress):
        if not isinstance(idx, slice):  # the plan indexes the split's documents: make it index all of them
            plan = PackPlan(idx[plan.seg_doc], plan.seg_start, plan.seg_len, plan.row_ptr)
        del idx
        if doc_offset is None:
            doc_offset = np.zeros(num_docs, doc_len.dtype)
            np.cumsum(doc_len[:-1], dtype=doc_len.dtype, out=doc_offset[1:])
        store = TokenStore(tokens=tokens, doc_offset=doc_offset, doc_len=doc_len, doc_id=doc_id)
        progress.start(f"write {name}", float(plan.num_rows))
        splits[name] = write_split(
            store,
            plan,
            split=name,
            out_dir=cfg.out,
            metadata=split_metadata(cfg, tok, name),
            rows_per_shard=rows_per_shard,
            on_rows=lambda n: (progress.advance(n), _release_pages(tokens), _release_pages(doc_id)),
            reuse=lambda file, split=name: journal.reusable_shard(split, file),
            on_shard=lambda info, split=name: journal.shard_done(split, info),
        )
        del plan, store  # before the next split is planned
    return splits


READ_BLOCK = 1 << 20
"""Entries read at a time from a per-document file."""


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


def require_documents(docs: DocumentAccounting) -> None:
    """Refuse a corpus in which no document survived reading and the long-document policy."""
    if docs.packed == 0:
        raise InputError(
            f"no documents to pack: {docs.docs_in:,} records read, {docs.skipped:,} skipped"
            f" (empty {docs.skipped_empty:,}, missing field {docs.skipped_missing_field:,}, invalid {docs.skipped_invalid:,}),"
            f" {docs.dropped:,} dropped as longer than --seq-len. Check the inputs and `--text-field`."
        )


def plan_splits(
    cfg: PackConfig, doc_len: np.ndarray, val: np.ndarray | None, progress: Progress
) -> Iterator[tuple[str, np.ndarray | slice, PackPlan]]:
    """``(split, indices of its documents, plan)`` of each split written; a global plan over every document.

    ``val``: each document's val flag (``None``: none is). A split holding every document gets the
    indices ``slice(None)``, so that its lengths are not copied.
    """
    for name in SPLITS:
        if name == "val" and cfg.val_fraction == 0.0:
            continue
        idx = slice(None) if val is None else _members(val, name == "val")
        progress.start(f"pack {name}", None)
        yield (
            name,
            idx,
            make_plan(cfg.strategy, doc_len[idx], cfg.seq_len, allow_split=cfg.long_docs == "split"),
        )


def _members(val: np.ndarray, flag: bool) -> np.ndarray:
    """Indices of the documents whose val flag is ``flag``, in the narrowest type, a block at a time."""
    dtype = index_dtype(len(val))
    parts = [
        (np.flatnonzero(val[lo : lo + READ_BLOCK].astype(bool) == flag) + lo).astype(dtype)
        for lo in range(0, len(val), READ_BLOCK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


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


def finish(
    cfg: PackConfig,
    tok: LoadedTokenizer,
    inputs: tuple[InputInfo, ...],
    docs: DocumentAccounting,
    splits: dict[str, SplitInfo],
    ignored: tuple[IgnoredInput, ...] = (),
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
        ),
        inputs=inputs,
        documents=docs,
        splits=splits,
        created_by=f"prep {__version__}",
        ignored=ignored,
    )
    problems = docs.problems()
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
