"""The encoder: batches of documents to token ids on every core, the fast encoder checked against `tokenizers`.

:class:`Encoder` turns an iterator of jobs into an iterator of :class:`EncodedBatch` (one flat int32 array
plus per-document lengths), in input order. Two back-ends can do the work:

- ``tiktoken``: :class:`prep.fast_bpe.FastBPE`, rebuilt from the same ``tokenizer.json``, run in a pool of
  forked worker processes (the parent builds it once; children inherit it). Each job also picks a sample
  of its batch (the first documents, about ``CHECK_FRACTION`` of the batch's characters, plus every
  document holding a non-special added token), which `tokenizers` re-encodes before the batch is
  accepted: in a :class:`ReferenceProcess` during `prep pack`, else in this process.
- ``tokenizers``: ``encode_batch_fast`` in this process (its own Rust thread pool), the reference.

What a caller meets is :func:`open_encoder` (one ``with`` owns every process), :func:`source_jobs` (an input
file as jobs) and :meth:`Encoder.map`; after a job is encoded, ``job.records`` holds what packing needs of
its records. Behind that interface sit three speed mechanisms, each kept because a benchmark shows it pays
(docs/design.md names the figures): the reference process, which loads `tokenizers` while this process
builds the fast encoder and then checks samples off the packing core; JSONL jobs (:class:`JsonlChunk`),
decoded by the worker that tokenizes them, so the reading process does no work per record; and the fast
back-end's caches (the one built last, kept in this process, and its derived tables on disk, see
prep/fast_bpe.py).

The first difference, or a tokenizer the fast encoder does not support, switches the run to `tokenizers`
for good, with a one-line notice; a batch whose sample differed is re-encoded by `tokenizers`, so every
checked id is exactly what `tokenizers` gives. ``PREP_ENCODER=tokenizers`` (or its older spelling
``PREP_ENGINE``) forces the reference (to rule the fast one out when debugging, and for the benchmarks'
side-by-side runs). Jobs in flight are bounded (two per worker), so memory is a few batches whatever the
corpus size.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer

from prep.fast_bpe import EncodedBatch, FastBPE, Unsupported
from prep.faults import worker_died
from prep.journal import kill_point
from prep.provenance import InputDigest, is_stdin
from prep.readers import (
    BatchRecords,
    InputFile,
    Record,
    jsonl_chunk_lines,
    jsonl_record,
    read_jsonl_chunks,
    read_records,
    summarize,
)
from prep.tokenizer import LoadedTokenizer, TokenizerError, load_tokenizer, resolve_tokenizer_file
from shared.fileio import sha256_file

CHECK_FRACTION = 0.01
"""Share of each batch's characters (at least one document) re-encoded with `tokenizers` and compared."""
MAX_ADDED_TOKEN_CHECKS = 16
"""Documents holding a non-special added token checked per batch, on top of the leading sample."""
MAX_CHECK_CHARS = 1 << 20
"""Longest document (in characters) re-encoded with `tokenizers` for the check."""

BATCH_CHARS = 4 << 20
"""Characters of text encoded per job: large enough to keep every core busy, small enough to bound memory."""

FAST, REFERENCE = "tiktoken", "tokenizers"
ENCODER_ENV = "PREP_ENCODER"
OLD_ENCODER_ENV = "PREP_ENGINE"
"""The variable's earlier name, still read: users may have scripts that set it."""
T = TypeVar("T")
_PR_SET_PDEATHSIG = 1

# A pool worker's fast encoder: inherited through fork from the parent (no copy, no rebuild), set by _pool_worker_init.
_WORKER: FastBPE | None = None


def reference_forced() -> bool:
    """Whether the environment asks for `tokenizers` only (``PREP_ENCODER=tokenizers``, or ``PREP_ENGINE``)."""
    return os.environ.get(ENCODER_ENV, os.environ.get(OLD_ENCODER_ENV)) == REFERENCE


def reference_encode(tokenizer: Tokenizer, texts: list[str]) -> EncodedBatch:
    """`tokenizers`' ids as an :class:`EncodedBatch` (the tokenizer must have encode_special_tokens set)."""
    encoded = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    return EncodedBatch(ids=ids, lengths=lengths)


def _check_indices(fast: FastBPE, texts: list[str], added_docs: list[int] | None = None) -> list[int]:
    """Which documents of a batch to compare: the leading ~1% of characters, then added-token holders.

    Documents over ``MAX_CHECK_CHARS`` are left out: `tokenizers` needs far more memory per character than
    the fast encoder on one long document, and the sample exists to catch a back-end that is wrong, which
    ordinary documents show as well.
    """
    budget = CHECK_FRACTION * sum(map(len, texts))
    picked, chars = [], 0
    for i, text in enumerate(texts):
        if picked and chars >= budget:
            break
        if len(text) <= MAX_CHECK_CHARS:
            picked.append(i)
            chars += len(text)
    after = picked[-1] + 1 if picked else len(texts)
    if added_docs is None:  # which documents hold an added token, unless the encoder already said
        added_docs = [i for i in range(after, len(texts)) if fast.has_added_token(texts[i])]
    risky = [i for i in added_docs if i >= after and len(texts[i]) <= MAX_CHECK_CHARS]
    return picked + risky[:MAX_ADDED_TOKEN_CHECKS]


@dataclass(frozen=True, slots=True)
class Sample:
    """The documents of a batch whose ids are compared with `tokenizers`' (see :func:`_check_indices`)."""

    index: list[int]
    """Each document's index in its batch."""
    texts: list[str]

    def ids(self, got: EncodedBatch) -> list[np.ndarray]:
        """The fast encoder's ids of each sampled document, from the batch's ``got``."""
        starts = np.concatenate([[0], np.cumsum(got.lengths)])
        return [got.ids[starts[i] : starts[i + 1]] for i in self.index]


def check_sample(fast: FastBPE, texts: list[str], added_docs: list[int] | None = None) -> Sample:
    """The :class:`Sample` of a batch; ``added_docs`` as :meth:`FastBPE.encode_batch` reported them."""
    index = _check_indices(fast, texts, added_docs)
    return Sample(index, [texts[i] for i in index])


def first_difference(
    reference: Tokenizer, texts: list[str], ids: list[np.ndarray], index: list[int]
) -> str | None:
    """``None`` when `tokenizers` gives each of ``texts`` its ``ids``; otherwise what differed, for the notice.

    ``index``: each text's index in its batch, which the message names.
    """
    want = reference_encode(reference, texts)
    offset = 0
    for k, (i, actual) in enumerate(zip(index, ids, strict=True)):
        expected = want.ids[offset : offset + want.lengths[k]]
        offset += int(want.lengths[k])
        if not np.array_equal(expected, actual):
            n = min(len(expected), len(actual))
            pos = (
                int(np.flatnonzero(expected[:n] != actual[:n])[0])
                if (expected[:n] != actual[:n]).any()
                else n
            )
            return (
                f"document {i} of the batch differs at token {pos} ({len(actual)} vs {len(expected)} tokens)"
            )
    return None


def first_mismatch(
    fast: FastBPE,
    reference: Tokenizer,
    texts: list[str],
    got: EncodedBatch,
    added_docs: list[int] | None = None,
) -> str | None:
    """:func:`first_difference` of a batch's :class:`Sample`, in this process."""
    sample = check_sample(fast, texts, added_docs)
    return first_difference(reference, sample.texts, sample.ids(got), sample.index)


def _worker_init() -> None:
    # One worker is one core: the reference check must not start a thread pool of its own.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C is the parent's to handle (it shuts the pool down); a worker printing its own traceback is noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the parent dies, even by SIGKILL (or it would outlive it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: workers still exit when the parent closes the pool's pipes
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


@dataclass(slots=True)
class JsonlChunk:
    """Whole lines of a JSONL file (:func:`prep.readers.jsonl_chunks`) as one job, decoded where they are tokenized.

    :meth:`Encoder.map` sets :attr:`records` (what packing needs of the chunk's records, not their texts)
    before it yields the job's ids.
    """

    path: str
    text_field: str
    val_fraction: float
    first_line: int
    data: bytes
    records: BatchRecords | None = None
    hashes: bool = False
    """Keep each text's content hash in :attr:`records` (a mixture samples by it)."""

    def decode(self) -> list[Record]:
        lines = jsonl_chunk_lines(self.first_line, self.data)
        return [jsonl_record(self.path, n, raw, self.text_field) for n, raw in lines]

    def texts(self) -> list[str]:
        """The texts to tokenize; sets :attr:`records`."""
        records = self.decode()
        self.records = summarize(records, self.val_fraction, self.hashes)
        return [r.text for r in records if r.text is not None]


@dataclass(frozen=True, slots=True)
class RecordsJob:
    """Records read in the packing process as one job: their texts go to a worker, their summary stays here."""

    records: BatchRecords
    texts: list[str]


class LocalJob:
    """A job that encodes itself with `tokenizers` (:meth:`encode`), in its place among the others: the
    conversations of prep/chat_pack.py, which the fast encoder does not render. Without a fast encoder
    (a pack of conversations only) such jobs go to a pool of forked workers holding the tokenizer; beside
    one, in the packing process. A worker sends back what :meth:`encode` gave and :attr:`records`."""

    records: BatchRecords | None

    def encode(self, tokenizer: Tokenizer) -> object:
        raise NotImplementedError


Job = list[str] | RecordsJob | JsonlChunk | LocalJob
"""What :meth:`Encoder.map` tokenizes: texts, records read here, JSONL lines to decode first, or a job that
encodes itself."""


def job_texts(job: list[str] | RecordsJob | JsonlChunk) -> list[str]:
    """The texts of a job, decoding a JSONL chunk here (which sets its records)."""
    if isinstance(job, JsonlChunk):
        return job.texts()
    return job.texts if isinstance(job, RecordsJob) else job


def _worker_job(job: Job) -> list[str] | JsonlChunk:
    """What a worker needs of a job: records read here stay here."""
    return job.texts if isinstance(job, RecordsJob) else job


def record_jobs(records: Iterable[Record], val_fraction: float, hashes: bool = False) -> Iterator[RecordsJob]:
    """``records`` as jobs of about ``BATCH_CHARS`` characters of text; ``hashes``: keep content hashes."""
    batch: list[Record] = []
    total = 0
    for record in records:
        batch.append(record)
        total += len(record.text) if record.text else 0
        if total >= BATCH_CHARS:
            yield RecordsJob(
                summarize(batch, val_fraction, hashes), [r.text for r in batch if r.text is not None]
            )
            batch, total = [], 0
    if batch:
        yield RecordsJob(
            summarize(batch, val_fraction, hashes), [r.text for r in batch if r.text is not None]
        )


def empty_job(val_fraction: float, hashes: bool = False) -> RecordsJob:
    """The job of an input without records: it still closes its source."""
    return RecordsJob(summarize([], val_fraction, hashes), [])


def source_jobs(
    source: InputFile,
    *,
    text_field: str,
    val_fraction: float,
    hashes: bool = False,
    skip: int,
    spread: int,
    on_bytes: Callable[[int], None],
    digest: InputDigest | None = None,
) -> Iterator[Job]:
    """The records of ``source`` from its ``skip``-th on, as jobs.

    A JSONL input goes as chunks of whole lines that the worker encoding them decodes; other inputs are
    read here. ``spread``: the number of workers, which chunks are sized to keep busy. ``digest`` gets
    every byte of the input, the skipped records' included, by the time the last job is made.
    """
    if source.format == "jsonl":
        chunks = read_jsonl_chunks(
            source, on_bytes, size=BATCH_CHARS, skip=skip, spread=spread, digest=digest
        )
        name = "<stdin>" if is_stdin(source.path) else source.name
        return (JsonlChunk(name, text_field, val_fraction, *chunk, hashes=hashes) for chunk in chunks)
    records = read_records(source, text_field, lambda n: on_bytes(n), digest)
    return record_jobs(islice(records, skip, None), val_fraction, hashes)


_LOCAL_TOKENIZER: Tokenizer | None = None
"""A local-job worker's `tokenizers` model: the parent's, inherited through fork."""


def _local_worker_init(tokenizer: Tokenizer) -> None:
    global _LOCAL_TOKENIZER
    _LOCAL_TOKENIZER = tokenizer
    _worker_init()


def _local_job(job: LocalJob) -> tuple[object, BatchRecords | None]:
    """A :class:`LocalJob` encoded in a worker: its result, and the records it decoded there."""
    assert _LOCAL_TOKENIZER is not None, "worker forked without the tokenizer"
    kill_point("worker")
    return job.encode(_LOCAL_TOKENIZER), job.records


def _pool_worker_init(fast: FastBPE) -> None:
    global _WORKER
    _WORKER = fast
    _worker_init()


def _fast_job(
    job: list[str] | JsonlChunk, fast: FastBPE | None = None
) -> tuple[EncodedBatch, Sample, BatchRecords | None]:
    """Ids, the sample to check against `tokenizers`, and a JSONL chunk's records.

    The records travel back as :class:`BatchRecords`: their texts are of no more use to the parent.
    """
    fast = fast or _WORKER
    assert fast is not None, "worker forked without the fast encoder"
    kill_point("worker")
    texts = job.texts() if isinstance(job, JsonlChunk) else job
    added_docs: list[int] = []
    got = fast.encode_batch(texts, added_docs)
    records = job.records if isinstance(job, JsonlChunk) else None
    return got, check_sample(fast, texts, added_docs), records


def _serve_reference(
    tokenizer: str, eos_token: str | None, bos_token: str | None, conn: Connection, parent_end: Connection
) -> None:
    """The body of :class:`ReferenceProcess`: load the tokenizer, send its info, then answer checks."""
    # Only the parent may hold its end: then a parent that dies or closes mid-message ends recv() here.
    parent_end.close()
    # A collection would write to the header of every object inherited from the parent, copying each
    # page; this process makes no cycles worth collecting.
    gc.disable()
    _worker_init()
    status = 0
    try:
        try:
            tok = load_tokenizer(tokenizer, eos_token=eos_token, bos_token=bos_token)
        except TokenizerError as e:
            conn.send(("error", e))
            return
        except Exception:  # the parent loads the tokenizer itself and meets the same error there
            conn.send(("failed", None))
            return
        conn.send(("ok", tok.info))
        reference = tok.tokenizer
        while (request := conn.recv()) is not None:
            conn.send(first_difference(reference, *request))
    except (EOFError, OSError):
        pass  # the parent is gone
    except BaseException:  # a bug: say where; the parent, finding the pipe closed, checks in its process
        traceback.print_exc()
        status = 1
    finally:
        conn.close()
        # Exit here: returning would first free the tokenizers model, which the parent waits for.
        os._exit(status)


class ReferenceProcess:
    """`tokenizers` in a forked process: it loads the tokenizer, resolves its info, then checks samples.

    Loading the reference model and building the fast encoder each take a noticeable share of a small
    pack; this process loads the one while the packing process builds the other, then answers every
    batch's check, so the packing process never loads the reference model unless the run falls back to it.
    """

    def __init__(self, tokenizer: str | Path, eos_token: str | None, bos_token: str | None) -> None:
        self._args = (str(tokenizer), eos_token, bos_token)
        self._loaded: LoadedTokenizer | None = None
        context = multiprocessing.get_context("fork")
        self._conn, child_end = context.Pipe()
        self._process: multiprocessing.process.BaseProcess | None = context.Process(
            target=_serve_reference, args=(*self._args, child_end, self._conn), daemon=True
        )
        self._process.start()
        child_end.close()

    def loaded(self) -> LoadedTokenizer:
        """The tokenizer as :func:`load_tokenizer` gives it, its model not loaded here; raises what that raises."""
        if self._loaded is None:
            try:
                status, value = self._conn.recv()
            except (EOFError, OSError):  # the process died (killed, out of memory)
                status, value = "failed", None
            if status != "ok":
                self.close()
            if status == "error":
                raise value
            path, eos_token, bos_token = self._args
            self._loaded = (
                LoadedTokenizer(value)
                if status == "ok"
                else load_tokenizer(path, eos_token=eos_token, bos_token=bos_token)
            )
        return self._loaded

    def first_difference(self, sample: Sample, got: EncodedBatch) -> str | None:
        """:func:`first_difference` of ``sample``, computed there; EOFError or OSError if the process died."""
        self.loaded()  # its first message is the tokenizer's info
        if self._process is None:
            raise EOFError("the reference process is closed")
        self._conn.send((sample.texts, sample.ids(got), sample.index))
        return self._conn.recv()

    def close(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(OSError):  # it died already
            self._conn.send(None)
        self._conn.close()  # a half-sent request (Ctrl-C mid-send) ends in EOF there
        self._process.join(timeout=5)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
        self._process = None


def start_reference(
    tokenizer: str | Path, *, eos_token: str | None, bos_token: str | None, workers: int | None
) -> ReferenceProcess | None:
    """A :class:`ReferenceProcess` for a pack, or ``None`` where it cannot help.

    Not when the reference is forced, on one worker (the user asked for one core), or without fork.
    """
    if reference_forced() or (workers or os.cpu_count() or 1) < 2:
        return None
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    return ReferenceProcess(tokenizer, eos_token, bos_token)


_last_built: tuple[str, FastBPE] | None = None
"""The fast encoder this process built last, by the sha256 of its tokenizer.json.

Kept for the next pack with the same tokenizer, which then skips deriving and building it; and the pack
that built it does not pay for freeing tiktoken's tables on its way out. One back-end at most.
"""


def build_fast(tokenizer: str | Path, sha256: str | None = None) -> FastBPE | Exception:
    """The fast encoder of ``tokenizer`` (the one built last, for the same file), or why there is none.

    The reason is returned, not raised: :class:`Encoder` turns :class:`Unsupported` and a missing
    tiktoken into a notice, and a file `tokenizers` cannot load either fails there with its own message.
    """
    global _last_built
    try:
        path = resolve_tokenizer_file(tokenizer)
        sha256 = sha256 or sha256_file(path)
        if _last_built is None or _last_built[0] != sha256:
            _last_built = (sha256, FastBPE(path, sha256))
        return _last_built[1]
    except Exception as e:
        return e


@contextmanager
def open_encoder(
    tokenizer: str | Path,
    *,
    eos_token: str | None,
    bos_token: str | None,
    workers: int | None,
    notice: Callable[[str], None],
    use_fast: bool = True,
) -> Iterator[Encoder]:
    """An :class:`Encoder` for `prep pack` that owns every process it starts, closed when the block ends.

    With two or more workers the reference process loads `tokenizers` on another core while this one
    builds the fast encoder; the encoder's :attr:`~Encoder.tok` waits for it. ``use_fast=False``: no fast
    encoder, no process (every job encodes itself: a pack of conversations only).
    """
    if not use_fast:
        tok = load_tokenizer(tokenizer, eos_token=eos_token, bos_token=bos_token)
        with Encoder(tok, workers=workers, notice=notice, use_fast=False) as encoder:
            yield encoder
        return
    reference = start_reference(tokenizer, eos_token=eos_token, bos_token=bos_token, workers=workers)
    try:
        if reference is not None:
            encoder = Encoder(workers=workers, notice=notice, fast=build_fast(tokenizer), reference=reference)
        else:
            tok = load_tokenizer(tokenizer, eos_token=eos_token, bos_token=bos_token)
            encoder = Encoder(tok, workers=workers, notice=notice)
    except BaseException:
        if reference is not None:
            reference.close()
        raise
    with encoder:
        yield encoder


class Encoder:
    """Encodes jobs in order with the fastest exact back-end; see the module docstring."""

    def __init__(
        self,
        tok: LoadedTokenizer | None = None,
        *,
        workers: int | None = None,
        use_fast: bool = True,
        notice: Callable[[str], None] = lambda text: None,
        fast: FastBPE | Exception | None = None,
        reference: ReferenceProcess | None = None,
    ) -> None:
        """``fast``: what :func:`build_fast` gave (built here if not given); ``reference``: where to check
        samples (this process if not given). Without ``tok``, :attr:`tok` is the reference process's,
        resolved on first use, so that tokenizing can start before it is known; ``fast`` must be given.
        The encoder closes ``reference`` when it closes."""
        if tok is None and (reference is None or fast is None):
            raise ValueError("Encoder needs a tokenizer, or a reference process and a fast encoder")
        self._tok = tok
        self.workers = workers or os.cpu_count() or 1
        self.notice = notice
        self.name = REFERENCE
        self.fast: FastBPE | None = None
        self.num_checked_batches = 0
        self._pool: ProcessPoolExecutor | None = None
        self._local_pool: ProcessPoolExecutor | None = None
        self._reference_process = reference
        if not use_fast or reference_forced():
            return
        fast = build_fast(self.tok.info.path, self.tok.info.sha256) if fast is None else fast
        if isinstance(fast, Unsupported | ImportError):
            notice(
                f"tokenizing with `tokenizers` (the fast encoder does not support this tokenizer: {fast})"
                if isinstance(fast, Unsupported)
                else "tokenizing with `tokenizers`: the fast encoder needs tiktoken"
                " (`pip install 'packed-shards[fast]'`, or `pip install tiktoken`)"
            )
            if self._reference_process is not None:  # nothing to check: keep one copy of the model, here
                self.tok  # noqa: B018
                self._reference_process.close()
                self._reference_process = None
            return
        if isinstance(fast, Exception):
            self.tok  # noqa: B018 - a file `tokenizers` cannot load either fails here, with its message
            raise fast  # `tokenizers` loads it: a bug in the fast encoder
        self.fast = fast
        self.name = FAST

    @property
    def tok(self) -> LoadedTokenizer:
        """The tokenizer; raises what :func:`load_tokenizer` raises, when the reference process resolves it."""
        if self._tok is None:
            if self._reference_process is None:
                raise RuntimeError("the encoder was closed before its tokenizer was resolved")
            self._tok = self._reference_process.loaded()
        return self._tok

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close_pool()
        if self._local_pool is not None:
            self._local_pool.shutdown(wait=True, cancel_futures=True)
            self._local_pool = None
        if self._reference_process is not None:
            self._reference_process.close()
            self._reference_process = None

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _fall_back(self, reason: str) -> None:
        self.notice(f"tokenizing with `tokenizers` from here on: the fast encoder disagreed ({reason})")
        self.name = REFERENCE
        self._close_pool()

    def _start_pool(self) -> ProcessPoolExecutor | None:
        if self.workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
            return None
        context = multiprocessing.get_context("fork")
        return ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_pool_worker_init, initargs=(self.fast,)
        )

    def map(self, items: Iterable[tuple[T, Job]]) -> Iterator[tuple[T, EncodedBatch]]:
        """``(payload, ids)`` for each ``(payload, job)``, in order; reads at most two jobs per worker ahead.

        The fast encoder's workers get their first jobs before this returns, so they start at once (before
        :attr:`tok` is known, say). A :class:`JsonlChunk` job has its :attr:`~JsonlChunk.records` set when
        its ids are yielded.
        """
        items = iter(items)
        pending: deque[tuple[T, Job, Future | tuple]] = deque()
        failed: Exception | None = None
        if self.name == FAST:
            self._close_pool()  # a previous map's, if its results were never read to the end
            self._pool = self._start_pool()
            try:
                if self._pool is not None:
                    for payload, job in islice(items, 2 * self.workers):
                        done = (
                            None
                            if isinstance(job, LocalJob)
                            else self._pool.submit(_fast_job, _worker_job(job))
                        )
                        pending.append((payload, job, done))
            except Exception as e:  # reading the input failed: say so where the results are read, in order
                failed = e
            except BaseException:
                self._close_pool()
                raise
        return self._results(items, pending, failed)

    def _results(
        self, items: Iterator[tuple[T, Job]], pending: deque, failed: Exception | None = None
    ) -> Iterator[tuple[T, EncodedBatch]]:
        try:
            if failed is not None:
                yield from self._drain(pending)
                raise failed
            for payload, job in items:
                if isinstance(job, LocalJob) and self.fast is None and self._start_local_pool():
                    assert self._local_pool is not None
                    pending.append((payload, job, self._local_pool.submit(_local_job, job)))
                    while len(pending) > 2 * self.workers:
                        yield self._finish(*pending.popleft())
                    continue
                if self.name == REFERENCE:
                    yield from self._drain(pending)
                    yield payload, self._reference(job)
                    continue
                if isinstance(job, LocalJob):  # encoded here, when its turn comes
                    done = None
                else:
                    work = _worker_job(job)
                    done = (
                        _fast_job(work, self.fast)
                        if self._pool is None
                        else self._pool.submit(_fast_job, work)
                    )
                pending.append((payload, job, done))
                while len(pending) > (2 * self.workers if self._pool else 0):
                    yield self._finish(*pending.popleft())
            yield from self._drain(pending)
        except BrokenProcessPool as e:
            raise worker_died(self.workers) from e
        finally:
            self.close()

    def _drain(self, pending: deque) -> Iterator[tuple[T, EncodedBatch]]:
        while pending:
            yield self._finish(*pending.popleft())

    def _check(self, sample: Sample, got: EncodedBatch) -> str | None:
        """The first difference between ``got`` and `tokenizers` in ``sample``, wherever the reference runs."""
        if self._reference_process is not None:
            try:
                return self._reference_process.first_difference(sample, got)
            except (EOFError, OSError):  # it died (killed, out of memory): check in this process from now on
                self.tok  # noqa: B018 - resolved before it goes (loaded() has it by now)
                self._reference_process.close()
                self._reference_process = None
        return first_difference(self.tok.tokenizer, sample.texts, sample.ids(got), sample.index)

    def _reference(self, job: Job) -> EncodedBatch:
        """`tokenizers`' ids for a job, decoding a JSONL chunk here (a worker that did kept the texts)."""
        if isinstance(job, LocalJob):
            return job.encode(self.tok.tokenizer)
        return reference_encode(self.tok.tokenizer, job_texts(job))

    def _start_local_pool(self) -> bool:
        """Whether local jobs have a pool of workers (started on first use: two or more, and fork)."""
        if (
            self._local_pool is None
            and self.workers >= 2
            and "fork" in multiprocessing.get_all_start_methods()
        ):
            context = multiprocessing.get_context("fork")
            self._local_pool = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_local_worker_init,
                initargs=(self.tok.tokenizer,),
            )
        return self._local_pool is not None

    def _finish(self, payload: T, job: Job, done: Future | tuple | None) -> tuple[T, EncodedBatch]:
        if isinstance(job, LocalJob) and isinstance(done, Future):  # encoded in a local-job worker
            result, records = done.result()
            job.records = records
            return payload, result  # type: ignore[return-value]
        if self.name == REFERENCE or done is None:  # submitted before a switch (perhaps cancelled), or local
            return payload, self._reference(job)
        got, sample, records = done.result() if isinstance(done, Future) else done
        if records is not None:  # decoded in a worker
            job.records = records
        mismatch = self._check(sample, got)
        if mismatch is not None:
            self._fall_back(mismatch)
            return payload, self._reference(job)
        self.num_checked_batches += 1
        return payload, got
