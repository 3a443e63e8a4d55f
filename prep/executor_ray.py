"""`prep pack --executor ray`: the stages of prep/stages.py spread over a Ray cluster, with the same bytes out.

The driver (the machine running `prep pack`) keeps everything that needs the whole corpus at once; Ray tasks
do the work that splits cleanly::

    pass 1  one task per input file: read -> encode -> frame (the same encoder rules as local), write
            OUT/.pack-work/part-NNNNN.bin; return the file's per-document arrays and counts
    driver  concatenate per-document arrays in input order (file i's doc ids start after the records
            of files 0..i-1), then plan each split over EVERY document
    pass 3  one task per output shard: memory-map the part files, gather its rows, write the shard
    driver  finish: manifest last, then the data card

Every step that decides an output byte is a stage the local executor calls too (``frame``, ``plan``,
``write_shard``, ``finish``), and the part files laid end to end are exactly the local executor's
``tokens.bin``; so both executors write identical shards and manifests. The one exception would be a fast
encoder (tiktoken) id that differs from `tokenizers` on a document outside the checked sample: the switch
to `tokenizers` then happens per file here, per run locally (see prep/encoder.py).

Tasks read inputs and write parts and shards by path, so ``--out`` and every input (and the tokenizer) must
be on storage every node sees at the same path. Nothing else is shared through files: plans and
per-document arrays travel through Ray's object store. There is no journal: ``--resume`` is refused.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from prep.discovery import Discovery
from prep.encoder import Encoder, record_jobs
from prep.hub import is_hub
from prep.outdir import WORK_DIR, prepare_output_folder
from prep.packing import RowPlan
from prep.provenance import Fingerprint, InputDigest
from prep.readers import InputError, InputFile, read_records
from prep.recipe import RecipeError
from prep.stages import (
    PackConfig,
    Progress,
    finish,
    frame,
    input_info,
    mix,
    plan,
    record_kinds,
    require_documents,
    split_metadata,
)
from prep.tokenizer import LoadedTokenizer, TokenizerError, load_tokenizer
from prep.writer import TokenStore, default_rows_per_shard, shard_ranges, split_info, write_shard
from shared.contract import schema_with_metadata, shard_file_name
from shared.errors import UserError
from shared.manifest import DocumentAccounting, InputInfo, Manifest, MixtureInfo, ShardInfo

INSTALL_HINT = "pip install '.[ray]'"
CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    """The ``ray`` module, or a UserError that says how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError as e:
        raise UserError(
            f"`--executor ray` needs Ray, which is not installed here ({e}). Install it with `{INSTALL_HINT}`"
            " (on every node of the cluster), or use `--executor local`."
        ) from None
    return ray


class PartedTokens:
    """The part files of pass 1 as one flat int32 token array, for fancy indexing only.

    The local executor's ``tokens.bin`` is exactly these files laid end to end; instead of copying them
    together, a gather looks up which part each global index falls in. Parts are memory-mapped on first use.
    """

    def __init__(self, parts: list[tuple[str, int]]) -> None:
        self.paths = [path for path, _ in parts]
        sizes = np.array([n for _, n in parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._maps: dict[int, np.ndarray] = {}

    def _part(self, p: int) -> np.ndarray:
        if p not in self._maps:
            self._maps[p] = np.memmap(self.paths[p], dtype=np.int32, mode="r")
        return self._maps[p]

    def release(self) -> None:
        """Drop the pages read so far from this process's resident memory (they stay in the page cache).

        bfd gathers rows from all over the store, so otherwise every page of every part ends up resident.
        """
        for part in self._maps.values():
            mapped = getattr(part, "_mmap", None)
            if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        part = np.searchsorted(self.starts, index, side="right") - 1
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(self.paths) + 1))
        out = np.empty(len(index), dtype=np.int32)
        for p in np.flatnonzero(np.diff(bounds)):
            picked = order[bounds[p] : bounds[p + 1]]
            out[picked] = self._part(p)[index[picked] - self.starts[p]]
        return out


@dataclass(frozen=True, slots=True)
class FilePart:
    """What a pass-1 task returns for one input file (doc ids count from the file's first record)."""

    num_records: int
    counts: dict[str, int]
    doc_id: np.ndarray
    doc_len: np.ndarray
    is_val: np.ndarray
    num_tokens: int
    notices: list[str]
    fingerprint: Fingerprint
    doc_hash: np.ndarray | None = None
    """uint64 content hash per document, for a mixture (else None)."""


# One encoder per Ray worker process and tokenizer: building the fast encoder takes a while, files are many.
_ENCODERS: dict[tuple, tuple[LoadedTokenizer, Encoder]] = {}


def _worker_encoder(cfg: PackConfig, tokenizer_sha256: str, workers: int) -> tuple[LoadedTokenizer, Encoder]:
    key = (cfg.tokenizer, cfg.eos_token, cfg.bos_token, tokenizer_sha256, workers)
    if key not in _ENCODERS:
        tok = load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token, bos_token=cfg.bos_token)
        if tok.info.sha256 != tokenizer_sha256:
            raise TokenizerError(
                f"tokenizer `{cfg.tokenizer}` differs on this node (sha256 {tok.info.sha256[:12]}..., the driver"
                f" read {tokenizer_sha256[:12]}...). Put the tokenizer on storage every node sees at the same path."
            )
        _ENCODERS[key] = (tok, Encoder(tok, workers=workers))
    return _ENCODERS[key]


def tokenize_file(
    cfg: PackConfig, source: InputFile, num_bytes: int, tokenizer_sha256: str, part: str, workers: int
) -> FilePart | UserError:
    """Pass 1 for one input file (a Ray task). A user mistake is returned, not raised, to keep its message clean."""
    # One task owns `workers` cores: keep the `tokenizers` reference (a Rust thread pool) inside them.
    os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
    try:
        if source.num_bytes != num_bytes:
            raise InputError(
                f"input `{source.path}` has {source.num_bytes:,} bytes on this node but {num_bytes:,} on the"
                " driver. Inputs must be on storage every node sees at the same path."
            )
        tok, encoder = _worker_encoder(cfg, tokenizer_sha256, workers)
        notices: list[str] = []
        encoder.notice = notices.append
        counts = dict.fromkeys(DocumentAccounting.__dataclass_fields__, 0)
        ids, lens, flags, hashes = [], [], [], []
        next_id = num_tokens = 0
        digest = InputDigest()
        records = read_records(source, source.text_field or cfg.text_field, lambda n: None, digest)
        jobs = record_jobs(records, cfg.val_fraction, cfg.mixture is not None)
        with open(part, "wb") as out:
            for job, encoded in encoder.map((job, job) for job in jobs):
                framed = frame(cfg, tok, job.records, encoded, next_id, counts)
                ids.append(framed.doc_id)
                lens.append(framed.doc_len)
                flags.append(framed.is_val)
                if framed.doc_hash is not None:
                    hashes.append(framed.doc_hash)
                out.write(memoryview(framed.tokens))
                num_tokens += len(framed.tokens)
                next_id += framed.num_records
            out.flush()
            os.fsync(out.fileno())  # shard tasks on other nodes read this file next
        fingerprint = digest.fingerprint(source.path)
    except UserError as e:
        return e

    def joined(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    return FilePart(
        num_records=next_id,
        counts=counts,
        doc_id=joined(ids, np.int64),
        doc_len=joined(lens, np.int64),
        is_val=joined(flags, np.int8),
        num_tokens=num_tokens,
        notices=notices,
        fingerprint=fingerprint,
        doc_hash=joined(hashes, np.uint64) if cfg.mixture is not None else None,
    )


def write_shard_task(
    parts: list[tuple[str, int]],
    store_arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    row_plan: RowPlan,
    rows: tuple[int, int],
    path: str,
    metadata: dict,
) -> ShardInfo:
    """Pass 3 for one shard (a Ray task): the plan's rows ``rows`` gathered from the part files."""
    doc_offset, doc_len, doc_id = store_arrays
    tokens = PartedTokens(parts)
    store = TokenStore(tokens=tokens, doc_offset=doc_offset, doc_len=doc_len, doc_id=doc_id)
    schema = schema_with_metadata(metadata)
    return write_shard(
        store, row_plan, rows=rows, path=Path(path), schema=schema, on_rows=lambda n: tokens.release()
    )


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster (``address``, else RAY_ADDRESS, else a new local Ray); True if this call started Ray."""
    if ray.is_initialized():
        return False  # a notebook or a test joined one already: use it, and leave it running
    _check_reachable(address or os.environ.get("RAY_ADDRESS"))
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
        raise UserError(
            f"cannot start or join the Ray cluster at {where} ({e}). Check `--ray-address` / RAY_ADDRESS"
            " (`ray status` on the head node prints it), or leave both unset to run Ray on this machine. A"
            " cluster with token authentication (the default since Ray 2.59) also needs RAY_AUTH_MODE=token"
            " and its token here (RAY_AUTH_TOKEN; `ray get-auth-token` on the head node prints it)."
        ) from None
    return True


def _check_reachable(address: str | None) -> None:
    """Fail fast on a ``host:port`` nobody listens on: `ray.init` would retry it for minutes."""
    if address in (None, "", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise UserError(
            f"no Ray cluster answers at {address!r} ({e}). Check `--ray-address` / RAY_ADDRESS: the head"
            " node's GCS address (host:6379, as `ray status` prints it) or its client address (ray://host:10001)."
        ) from None


def _cpus_per_file(ray: Any, num_files: int) -> int:
    """Cores per pass-1 task: one, unless there are fewer files than cores (one big file gets a whole node)."""
    total = int(ray.cluster_resources().get("CPU", 1))
    per_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1)
    return max(1, min(per_node, total // max(1, num_files)))


def _tokenize_all(
    ray: Any, cfg: PackConfig, tok: LoadedTokenizer, sources: list[InputFile], progress: Progress
) -> list[FilePart]:
    """Pass 1 on the cluster; the first failing file in input order stops the run, as it does locally."""
    progress.start("tokenize", float(sum(s.num_bytes for s in sources)))
    workers = _cpus_per_file(ray, len(sources))
    task = ray.remote(tokenize_file).options(num_cpus=workers, max_retries=0)
    work = cfg.out / WORK_DIR
    # Workers need absolute paths: their working folder is not the driver's, and may be on another node.
    task_cfg = replace(cfg, tokenizer=str(Path(cfg.tokenizer).resolve()), out=cfg.out.resolve())
    refs = [
        task.remote(
            task_cfg,
            replace(s, path=s.path if s.url or is_hub(s.path) else s.path.resolve()),
            s.num_bytes,
            tok.info.sha256,
            str(_part_path(work.resolve(), i)),
            workers,
        )
        for i, s in enumerate(sources)
    ]
    results: list[FilePart | UserError | None] = [None] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    docs = tokens = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        results[i] = result = ray.get(ready[0])
        if isinstance(result, FilePart):
            docs, tokens = docs + result.counts["docs_in"], tokens + result.counts["tokens_packed"]
            for text in result.notices:
                progress.message(f"{sources[i].path}: {text}")
        progress.advance(sources[i].num_bytes, docs=docs, tokens=tokens)
        for earlier in results:
            if earlier is None:
                break
            if isinstance(earlier, UserError):
                for ref in pending:
                    ray.cancel(ref)
                # Let the cancelled tasks end before the caller removes the work folder they write into.
                ray.wait(list(pending), num_returns=len(pending))
                raise earlier
    return results  # type: ignore[return-value]


def _part_path(work: Path, index: int) -> Path:
    return work / f"part-{index:05d}.bin"


def first_doc_ids(parts: list[FilePart]) -> np.ndarray:
    """Doc id of each file's first record: doc ids count records across all inputs, in input order."""
    return np.concatenate([[0], np.cumsum([p.num_records for p in parts])[:-1]]).astype(np.int64)


def _write_splits(
    ray: Any,
    cfg: PackConfig,
    tok: LoadedTokenizer,
    parts: list[FilePart],
    part_files: list[tuple[str, int]],
    progress: Progress,
    mixed: tuple[tuple[InputInfo, ...], list[InputFile]],
) -> tuple[dict, MixtureInfo | None]:
    """Plan each split over all of its documents on the driver, then write its shards as Ray tasks.

    ``mixed``: the inputs as recorded and as found, which a mixture's plan reads each document's source from.
    """
    starts = first_doc_ids(parts)
    doc_id = np.concatenate([p.doc_id + first for p, first in zip(parts, starts, strict=True)])
    doc_len = np.concatenate([p.doc_len for p in parts])
    val = np.concatenate([p.is_val for p in parts]).astype(bool)
    doc_offset = np.concatenate([[0], np.cumsum(doc_len)[:-1]]).astype(np.int64)
    selection = None
    if cfg.mixture is not None:
        doc_hash = np.concatenate([p.doc_hash for p in parts if p.doc_hash is not None])
        selection = mix(cfg, doc_len, val if cfg.val_fraction else None, doc_hash, doc_id, *mixed)
    docs_in = sum(p.num_records for p in parts)
    rows_per_shard = cfg.rows_per_shard or default_rows_per_shard(cfg.seq_len)
    task = ray.remote(write_shard_task).options(num_cpus=1, max_retries=0)
    out = cfg.out.resolve()
    splits = {}
    for split in plan(cfg, doc_len, val, progress, selection):
        name, idx, rows = split.name, split.docs, split.rows
        ids = doc_id[idx] if split.copy is None else doc_id[idx] + split.copy * docs_in
        progress.start(f"write {name}", float(rows.num_rows))
        # Into the object store once; every shard task of the split reads the same copy (zero-copy per node).
        plan_ref = ray.put(rows)
        store_ref = ray.put((doc_offset[idx], doc_len[idx], ids))
        metadata = split_metadata(cfg, tok, name)
        ranges = shard_ranges(rows.num_rows, rows_per_shard)
        refs = [
            task.remote(
                part_files,
                store_ref,
                plan_ref,
                rows,
                str(out / shard_file_name(name, k, len(ranges))),
                metadata,
            )
            for k, rows in enumerate(ranges)
        ]
        rows_of = {ref: hi - lo for ref, (lo, hi) in zip(refs, ranges, strict=True)}
        pending = set(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.discard(ready[0])
            progress.advance(rows_of[ready[0]])
        shards = ray.get(refs)
        store = TokenStore(
            tokens=np.zeros(0, np.int32), doc_offset=doc_offset[idx], doc_len=doc_len[idx], doc_id=ids
        )
        splits[name] = split_info(store, rows, shards)
    return splits, None if selection is None else selection.info


def pack_with_ray(cfg: PackConfig, found: Discovery, progress: Progress) -> Manifest:
    """`prep.pipeline.pack` for ``executor="ray"`` (this driver holds the output folder's lock); see the module
    docstring."""
    ray = import_ray()
    tok = load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token, bos_token=cfg.bos_token)
    sources = list(found.files)
    if record_kinds(cfg, sources) is not None:
        raise UserError(
            "some inputs hold conversations or prompt/completion pairs, which `--executor ray` does not pack"
            " yet; pack them with `--executor local` (the default)."
        )
    prepare_output_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    work = cfg.out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = False
    try:
        try:
            started = _connect(ray, cfg.ray_address)
            parts = _tokenize_all(ray, cfg, tok, sources, progress)
            docs = DocumentAccounting(**{k: sum(p.counts[k] for p in parts) for k in parts[0].counts})
            require_documents(docs)
        except UserError:
            # As with the local executor: a mistake to fix leaves --out as it was.
            shutil.rmtree(work, ignore_errors=True)
            raise
        part_files = [
            (str(_part_path(work.resolve(), i)), p.num_tokens) for i, p in enumerate(parts) if p.num_tokens
        ]
        inputs = tuple(
            input_info(
                s,
                int(first),
                p.num_records,
                p.fingerprint,
                num_docs=p.counts["packed"],
                num_tokens=p.counts["tokens_packed"],
            )
            for s, p, first in zip(sources, parts, first_doc_ids(parts), strict=True)
        )
        try:
            splits, mixture = _write_splits(ray, cfg, tok, parts, part_files, progress, (inputs, sources))
        except RecipeError:  # a Ray pack keeps no journal to resume from: leave --out as it was
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        if started:
            ray.shutdown()
    return finish(cfg, tok, inputs, docs, splits, found.ignored, mixture)
