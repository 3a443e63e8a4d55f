"""Tokenizing batches of documents on every core, fast engine first, `tokenizers` as the reference.

:class:`TokenEngine` turns an iterator of text batches into an iterator of :class:`EncodedBatch` (one flat
int32 array plus per-document lengths), in input order. Two engines can do the work:

- ``tiktoken``: :class:`prep.fast_bpe.FastBPE`, rebuilt from the same ``tokenizer.json``, run in a pool of
  forked worker processes (the parent builds it once; children inherit it). Each job also re-encodes a
  sample of its batch with `tokenizers` (the first documents, about ``CHECK_FRACTION`` of the batch's
  characters, plus every document holding a non-special added token) and reports the first difference.
- ``tokenizers``: ``encode_batch_fast`` in this process (its own Rust thread pool), the reference.

A job is a batch of texts, or a chunk of whole JSONL lines (:class:`JsonlChunk`), which the worker that
tokenizes it splits and decodes, sending back what packing needs of its records instead of their texts:
one process reads the input for every worker, so it does no work per record.

The first difference, or a tokenizer the fast engine does not support, switches the run to `tokenizers`
for good, with a one-line notice; a batch whose sample differed is re-encoded by `tokenizers`, so every
checked id is exactly what `tokenizers` gives. ``PREP_ENGINE=tokenizers`` in the environment forces the
reference engine (to rule the fast one out when debugging, and for the benchmarks' side-by-side runs). Jobs in flight are bounded (two per worker), so memory is
a few batches whatever the corpus size.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer

from prep.fast_bpe import EncodedBatch, FastBPE, Tables, Unsupported, derive_tables
from prep.readers import BatchRecords, Record, jsonl_chunk_lines, jsonl_record, summarize
from prep.tokenizer import LoadedTokenizer, TokenizerError, resolve_tokenizer_file
from shared.fileio import sha256_file

CHECK_FRACTION = 0.01
"""Share of each batch's characters (at least one document) re-encoded with `tokenizers` and compared."""
MAX_ADDED_TOKEN_CHECKS = 16
"""Documents holding a non-special added token checked per batch, on top of the leading sample."""
MAX_CHECK_CHARS = 1 << 20
"""Longest document (in characters) re-encoded with `tokenizers` for the check."""

FAST, REFERENCE = "tiktoken", "tokenizers"
ENGINE_ENV = "PREP_ENGINE"
T = TypeVar("T")
_PR_SET_PDEATHSIG = 1

# Set in the parent before the pool forks, so that workers inherit the engines without rebuilding them.
_WORKER: tuple[FastBPE, Tokenizer] | None = None


def reference_encode(tokenizer: Tokenizer, texts: list[str]) -> EncodedBatch:
    """`tokenizers`' ids as an :class:`EncodedBatch` (the tokenizer must have encode_special_tokens set)."""
    encoded = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    return EncodedBatch(ids=ids, lengths=lengths)


def _check_indices(fast: FastBPE, texts: list[str], added_docs: list[int] | None = None) -> list[int]:
    """Which documents of a batch to compare: the leading ~1% of characters, then added-token holders.

    Documents over ``MAX_CHECK_CHARS`` are left out: `tokenizers` needs about 100 bytes per character to
    encode one document (4.8 GB for a 50 MB document, against 0.55 GB for the fast engine), and the
    sample exists to catch an engine that is wrong, which ordinary documents show as well.
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


def first_mismatch(
    fast: FastBPE,
    reference: Tokenizer,
    texts: list[str],
    got: EncodedBatch,
    added_docs: list[int] | None = None,
) -> str | None:
    """``None`` when the checked documents' ids equal `tokenizers`'; otherwise what differed, for the notice.

    ``added_docs``: the documents holding an added token, as :meth:`FastBPE.encode_batch` reported them.
    """
    picked = _check_indices(fast, texts, added_docs)
    want = reference_encode(reference, [texts[i] for i in picked])
    starts = np.concatenate([[0], np.cumsum(got.lengths)])
    offset = 0
    for k, i in enumerate(picked):
        expected = want.ids[offset : offset + want.lengths[k]]
        offset += int(want.lengths[k])
        actual = got.ids[starts[i] : starts[i + 1]]
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

    :meth:`TokenEngine.map` sets :attr:`records` (what packing needs of the chunk's records, not their texts)
    before it yields the job's ids.
    """

    path: str
    text_field: str
    val_fraction: float
    first_line: int
    data: bytes
    records: BatchRecords | None = None

    def decode(self) -> list[Record]:
        lines = jsonl_chunk_lines(self.first_line, self.data)
        return [jsonl_record(self.path, n, raw, self.text_field) for n, raw in lines]

    def texts(self) -> list[str]:
        """The texts to tokenize; sets :attr:`records`."""
        records = self.decode()
        self.records = summarize(records, self.val_fraction)
        return [r.text for r in records if r.text is not None]


Job = list[str] | JsonlChunk
"""What :meth:`TokenEngine.map` tokenizes: texts, or JSONL lines to decode first."""


def _fast_job(job: Job) -> tuple[EncodedBatch, str | None, BatchRecords | None]:
    """Ids, the first difference from the reference in the checked sample, and a JSONL chunk's records.

    The records travel back as :class:`BatchRecords`: their texts are of no more use to the parent.
    """
    assert _WORKER is not None, "worker forked without the engine"
    fast, reference = _WORKER
    texts = job.texts() if isinstance(job, JsonlChunk) else job
    added_docs: list[int] = []
    got = fast.encode_batch(texts, added_docs)
    records = job.records if isinstance(job, JsonlChunk) else None
    return got, first_mismatch(fast, reference, texts, got, added_docs), records


def _derive_in_child(path: Path, conn: Connection) -> None:
    # A collection would write to the header of every object inherited from the parent, copying each
    # page (140 MB measured); this short-lived child makes no cycles worth collecting.
    gc.disable()
    _worker_init()
    try:
        conn.send(("ok", derive_tables(path)))
    except Unsupported as e:
        conn.send(("unsupported", str(e)))
    except Exception:  # the parent derives the tables itself and meets the same error there
        conn.send(("failed", None))
    finally:
        conn.close()


class PendingTables:
    """The fast engine's tables (:func:`derive_tables`), derived in a forked process meanwhile.

    Deriving them (parsing tokenizer.json, 150k merges to ranks: ~0.8 s) and loading the reference
    `tokenizers` model (~0.7-1 s) used to run one after the other on one core before the first batch;
    `prep pack` now starts this process, loads the reference, then calls :meth:`collect`. The child only
    runs Python on data it already holds (no imports, no threads), and sends the tables back pickled.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._outcome: tuple[str, object] | None = None
        context = multiprocessing.get_context("fork")
        self._conn, child_end = context.Pipe(duplex=False)
        self._process = context.Process(target=_derive_in_child, args=(path, child_end), daemon=True)
        self._process.start()
        child_end.close()

    def collect(self) -> None:
        """Receive the child's outcome and reap it (it cannot finish before the parent reads: the pipe)."""
        if self._outcome is not None:
            return
        try:
            self._outcome = self._conn.recv()
        except (EOFError, OSError):  # the child died (killed, out of memory): derive here instead
            self._outcome = ("failed", None)
        finally:
            self._conn.close()
            self._process.join()

    def result(self) -> Tables:
        """The tables; :class:`Unsupported` as the child met it; derived here if the child failed."""
        self.collect()
        assert self._outcome is not None
        status, value = self._outcome
        if status == "ok":
            return value  # type: ignore[return-value]
        if status == "unsupported":
            raise Unsupported(value)
        return derive_tables(self.path)


def prefetch_tables(tokenizer: str | Path, workers: int | None = None) -> PendingTables | None:
    """Start deriving the fast engine's tables on another core; ``None`` where that would not help.

    Not when the reference engine is forced, on one worker (the user asked for one core), without fork,
    for a path that does not resolve (loading the tokenizer reports that), or when this process has
    the engine of that tokenizer built already.
    """
    if os.environ.get(ENGINE_ENV) == REFERENCE or (workers or os.cpu_count() or 1) < 2:
        return None
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    try:
        path = resolve_tokenizer_file(tokenizer)
    except TokenizerError:
        return None
    if _last_built is not None and path.is_file() and _last_built[0] == sha256_file(path):
        return None
    return PendingTables(path)


_last_built: tuple[str, FastBPE] | None = None
"""The fast engine this process built last, by the sha256 of its tokenizer.json.

Kept for the next pack with the same tokenizer, which then skips deriving and building it (~0.9 s of
CPU); and the pack that built it does not pay for freeing tiktoken's tables (~0.16 s) on its way out.
One engine at most: about 100 MB.
"""


def _fast_engine(path: Path, sha256: str, tables: PendingTables | None) -> FastBPE:
    """The fast engine of the tokenizer ``path`` (whose sha256 is given): the last one built, or a new one."""
    global _last_built
    if _last_built is not None and _last_built[0] == sha256:
        return _last_built[1]
    fast = FastBPE(path, tables.result() if tables is not None and tables.path == path else None)
    _last_built = (sha256, fast)
    return fast


class TokenEngine:
    """Encodes text batches in order with the fastest exact engine; see the module docstring."""

    def __init__(
        self,
        tok: LoadedTokenizer,
        *,
        workers: int | None = None,
        use_fast: bool = True,
        notice: Callable[[str], None] = lambda text: None,
        tables: PendingTables | None = None,
    ) -> None:
        self.tok = tok
        self.workers = workers or os.cpu_count() or 1
        self.notice = notice
        self.name = REFERENCE
        self.fast: FastBPE | None = None
        self.num_checked_batches = 0
        self._pool: ProcessPoolExecutor | None = None
        if tables is not None:
            tables.collect()  # never leave the child waiting on its pipe, whatever happens below
        if not use_fast or os.environ.get(ENGINE_ENV) == REFERENCE:
            return
        try:
            self.fast = _fast_engine(resolve_tokenizer_file(tok.info.path), tok.info.sha256, tables)
        except Unsupported as e:
            notice(f"tokenizing with `tokenizers` (the fast engine does not support this tokenizer: {e})")
            return
        except ImportError:
            notice(
                "tokenizing with `tokenizers`: the fast engine needs tiktoken"
                " (`pip install 'packed-shards[fast]'`, or `pip install tiktoken`)"
            )
            return
        self.name = FAST

    def __enter__(self) -> TokenEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _fall_back(self, reason: str) -> None:
        self.notice(f"tokenizing with `tokenizers` from here on: the fast engine disagreed ({reason})")
        self.name = REFERENCE
        self.close()

    def _start_pool(self) -> ProcessPoolExecutor | None:
        global _WORKER
        if self.workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
            return None
        _WORKER = (self.fast, self.tok.tokenizer)
        context = multiprocessing.get_context("fork")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init)

    def map(self, items: Iterable[tuple[T, Job]]) -> Iterator[tuple[T, EncodedBatch]]:
        """``(payload, ids)`` for each ``(payload, job)``, in order; reads at most two jobs per worker ahead.

        A :class:`JsonlChunk` job has its :attr:`~JsonlChunk.records` set when its ids are yielded.
        """
        global _WORKER
        if self.name == FAST:
            self._pool = self._start_pool()
            _WORKER = (self.fast, self.tok.tokenizer)
        pending: deque[tuple[T, Job, Future | tuple]] = deque()
        try:
            for payload, job in items:
                if self.name == REFERENCE:
                    yield from self._drain(pending)
                    yield payload, self._reference(job)
                    continue
                done = _fast_job(job) if self._pool is None else self._pool.submit(_fast_job, job)
                pending.append((payload, job, done))
                while len(pending) > (2 * self.workers if self._pool else 0):
                    yield self._finish(*pending.popleft())
            yield from self._drain(pending)
        finally:
            _WORKER = None
            self.close()

    def _drain(self, pending: deque) -> Iterator[tuple[T, EncodedBatch]]:
        while pending:
            yield self._finish(*pending.popleft())

    def _reference(self, job: Job) -> EncodedBatch:
        """`tokenizers`' ids for a job, decoding a JSONL chunk here (a worker that did kept the texts)."""
        return reference_encode(self.tok.tokenizer, job.texts() if isinstance(job, JsonlChunk) else job)

    def _finish(self, payload: T, job: Job, done: Future | tuple) -> tuple[T, EncodedBatch]:
        if self.name == REFERENCE:  # submitted before a switch; perhaps cancelled
            return payload, self._reference(job)
        got, mismatch, records = done.result() if isinstance(done, Future) else done
        if records is not None:  # decoded in a worker
            job.records = records
        if mismatch is not None:
            self._fall_back(mismatch)
            return payload, self._reference(job)
        self.num_checked_batches += 1
        return payload, got
