"""Crash safety for `prep pack`: a journal in ``OUT/.pack-work`` from which ``--resume`` finishes a killed run.

The work folder holds::

    tokens.bin     int32 token streams of pass 1, appended batch by batch
    doc_id.bin     int64 per packed document, appended in step with tokens.bin
    doc_len.bin    int64 per packed document
    is_val.bin     int8 per packed document
    doc_hash.bin   uint64 per packed document, only for a mixture (prep/mixture.py)
    targets.bin    uint8 per token, in step with tokens.bin: 1 where the token is a target (only in a pack
                   of conversations or prompt/completion pairs, whose labels follow a mask)

Only the batch being committed is held in memory; packing reads the per-document files back afterwards.
    journal.json   the last commit point: the run's options, the pass-1 position and counts, finished shards

Protocol: data files are appended and fsynced first, then ``journal.json`` is replaced atomically. The
journal therefore always describes a consistent prefix of the data files; whatever a killed run appended
after its last commit is cut off on resume by truncating each file back to the committed length. Pass 1
commits after every tokenized batch and at the end of every input file, so a resume re-reads at most one
batch. Pass 2 (planning) is a pure function of the document lengths and is simply redone. Pass 3 records each
shard's :class:`ShardInfo` after the shard is renamed into place; on resume a recorded shard is kept only if
its size and sha256 still match, otherwise it is written again. Since every pass is deterministic, a resumed
run produces the same bytes as an uninterrupted one.

A resume is refused when the options, inputs (path, size, mtime) or tokenizer differ from the interrupted run,
and the message names the difference.

Test hook: ``PREP_TEST_KILL_AT=<phase>:<n>`` makes the process SIGKILL itself the n-th time it reaches
``<phase>``: ``tokenize`` (a batch appended and synced but not yet committed), ``shard`` (a shard renamed into
place but not yet recorded), ``manifest`` (every shard recorded, manifest not yet written), ``card``
(manifest written, card not yet) or ``worker`` (a tokenizing worker kills itself at its n-th job, as the
out-of-memory killer would). ``PREP_TEST_STOP_AT`` stops it there instead (SIGSTOP), to hold a run mid-way.
Only the tests set them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from prep.hub import is_hub
from prep.provenance import is_stdin, size_of
from prep.urls import is_url
from shared.errors import ShardIntegrityError, UserError
from shared.fileio import atomic_write_text, fsync_dir
from shared.manifest import InputInfo, ShardInfo
from shared.reader import check_shard_file

JOURNAL_NAME = "journal.json"
JOURNAL_VERSION = 1
TOKENS_NAME = "tokens.bin"
TARGETS_NAME = "targets.bin"
DOC_ARRAYS = {"doc_id": np.dtype(np.int64), "doc_len": np.dtype(np.int64), "is_val": np.dtype(np.int8)}
"""The per-document files of pass 1 (``NAME.bin``) and their dtypes."""
HASH_ARRAY = {"doc_hash": np.dtype(np.uint64)}
"""The per-document file a mixture adds: each document's content hash, which its sample is drawn by."""
PLAN_ONLY = ("mixture_plan",)
"""Fingerprint keys that shape only the plan: a resume may change them until the first shard is written."""
KILL_ENV = "PREP_TEST_KILL_AT"
STOP_ENV = "PREP_TEST_STOP_AT"
_kill_counts: dict[str, int] = {}


class ResumeError(UserError):
    """The interrupted run cannot be continued as asked."""


def kill_point(phase: str) -> None:
    """Test hook: SIGKILL this process the n-th time it reaches ``phase`` when PREP_TEST_KILL_AT=phase:n,
    or SIGSTOP it (it goes on at SIGCONT) when PREP_TEST_STOP_AT=phase:n."""
    _kill_counts[phase] = _kill_counts.get(phase, 0) + 1
    for env, sig in ((KILL_ENV, signal.SIGKILL), (STOP_ENV, signal.SIGSTOP)):
        spec = os.environ.get(env)
        if spec and spec.rpartition(":")[0] == phase and _kill_counts[phase] == int(spec.rpartition(":")[2]):
            os.kill(os.getpid(), sig)


def input_stats(paths: list[str | Path]) -> list[dict[str, Any]]:
    """What identifies an input's content cheaply: path, size and modification time (of every file in a folder;
    a URL's size alone)."""
    stats = []
    for path in paths:
        if is_stdin(path) or is_hub(path):  # stdin is never resumed; a Hub dataset is known by name
            stats.append({"path": str(path)})
            continue
        if is_url(path):
            stats.append({"path": str(path), "size": size_of(path), "mtime_ns": None})
            continue
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            stats.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stats


@dataclass(slots=True)
class Pass1State:
    """Where pass 1 stands: everything needed to continue reading after the last commit."""

    source_index: int = 0
    """Input file being read; ``len(inputs)`` once pass 1 is done."""
    records_done: int = 0
    """Records of that file already accounted for (a resume skips them)."""
    first_id: int = 0
    """doc_id of that file's first record."""
    next_id: int = 0
    token_bytes: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    inputs: list[InputInfo] = field(default_factory=list)
    done: bool = False
    num_docs: int = 0
    """Packed documents whose entries in the per-document files are committed."""
    target_bytes: int = 0
    """Committed bytes of ``targets.bin`` (0 in a pack without a target mask)."""

    def to_json(self) -> dict[str, Any]:
        keys = ("source_index", "records_done", "first_id", "next_id", "token_bytes", "counts", "done")
        raw = {k: getattr(self, k) for k in keys}
        raw["inputs"] = [asdict(i) for i in self.inputs]
        raw["num_docs"] = self.num_docs
        raw["target_bytes"] = self.target_bytes
        return raw


class Journal:
    """The work folder of one `prep pack` run and its commit points."""

    def __init__(
        self, work: Path, fingerprint: dict[str, Any], pass1: Pass1State, hashes: bool = False
    ) -> None:
        self.work = work
        self.fingerprint = fingerprint
        self.pass1 = pass1
        self.shards: dict[str, list[ShardInfo]] = {}
        self.arrays = {**DOC_ARRAYS, **(HASH_ARRAY if hashes else {})}
        """The per-document files this run keeps, with their dtypes."""
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self._pending_targets: list[np.ndarray] = []

    @property
    def tokens_path(self) -> Path:
        return self.work / TOKENS_NAME

    @classmethod
    def start(
        cls,
        work: Path,
        fingerprint: dict[str, Any],
        counts: dict[str, int],
        *,
        resume: bool,
        hashes: bool = False,
    ) -> Journal:
        """Continue the journal in ``work`` when resuming and one exists; otherwise start an empty one.

        ``hashes``: keep each document's content hash too (a mixture's run).
        """
        if resume and (work / JOURNAL_NAME).is_file():
            return cls._load(work, fingerprint, hashes)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        journal = cls(work, fingerprint, Pass1State(counts=dict(counts)), hashes)
        for name in [TOKENS_NAME] + [f"{n}.bin" for n in journal.arrays]:
            (work / name).touch()
        journal._save()
        return journal

    @classmethod
    def _load(cls, work: Path, fingerprint: dict[str, Any], hashes: bool) -> Journal:
        path = work / JOURNAL_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("version") != JOURNAL_VERSION:
                raise ValueError(f"journal version {raw.get('version')!r}")
            p = raw["pass1"]
            state = Pass1State(
                **{k: p[k] for k in ("source_index", "records_done", "first_id", "next_id", "token_bytes")},
                counts=p["counts"],
                inputs=[InputInfo(**i) for i in p["inputs"]],
                done=p["done"],
                num_docs=p["num_docs"],
                target_bytes=p.get("target_bytes", 0),
            )
            shards = {s: [ShardInfo(**i) for i in infos] for s, infos in raw["shards"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResumeError(
                f"`{path}` cannot be read ({e}); the interrupted run cannot be resumed. Pass `--overwrite`"
                " instead of `--resume` to start again."
            ) from e
        before = dict(raw["fingerprint"])
        if not shards:  # nothing written from the plan yet: what only shapes the plan may change
            for key in PLAN_ONLY:
                before[key] = fingerprint.get(key)
        differences = describe_differences(before, fingerprint)
        if differences:
            raise ResumeError(
                f"cannot resume the pack in `{work.parent}`: "
                + "; ".join(differences)
                + ". Re-run with the original options and inputs, or pass `--overwrite` instead of `--resume`"
                " to start again."
            )
        journal = cls(work, fingerprint, state, hashes)
        _truncate(work / TOKENS_NAME, state.token_bytes)
        for name, dtype in journal.arrays.items():
            _truncate(work / f"{name}.bin", state.num_docs * dtype.itemsize)
        if state.target_bytes or (work / TARGETS_NAME).exists():
            _truncate(work / TARGETS_NAME, state.target_bytes)
        journal.shards = shards
        return journal

    def discard(self) -> None:
        """Delete the work folder (prep.outdir.output_lock removes the output folder if the run created it)."""
        shutil.rmtree(self.work, ignore_errors=True)

    def open_tokens(self) -> BinaryIO:
        return open(self.tokens_path, "ab")

    @property
    def targets_path(self) -> Path:
        return self.work / TARGETS_NAME

    def append_targets(self, mask: np.ndarray) -> None:
        """One batch's target mask (uint8 per token, in step with its tokens); written by the next commit."""
        self._pending_targets.append(np.ascontiguousarray(mask, np.uint8))

    def doc_path(self, name: str) -> Path:
        """The per-document file ``name`` (a key of :data:`DOC_ARRAYS`)."""
        return self.work / f"{name}.bin"

    def append_docs(self, **arrays: np.ndarray) -> None:
        """One batch's ``doc_id``, ``doc_len`` and ``is_val``; written and synced by the next commit."""
        for name, values in arrays.items():
            self._pending[name].append(np.ascontiguousarray(values, self.arrays[name]))

    def commit_batch(self, tokens: BinaryIO, num_records: int) -> None:
        """``num_records`` more records of the current file are accounted for; make that durable."""
        self._sync_data(tokens)
        kill_point("tokenize")
        self.pass1.records_done += num_records
        self._save()

    def commit_source(self, tokens: BinaryIO, info: InputInfo) -> None:
        """The current input file is finished; the next one starts at record 0."""
        self._sync_data(tokens)
        p = self.pass1
        p.inputs.append(info)
        p.source_index += 1
        p.records_done = 0
        p.first_id = p.next_id
        self._save()

    def finish_pass1(self) -> None:
        if not self.pass1.done:
            self.pass1.done = True
            self._save()

    def reusable_shard(self, split: str, file: str) -> ShardInfo | None:
        """The recorded ShardInfo of ``file`` if the file on disk still matches it; else None (rewrite it)."""
        info = next((s for s in self.shards.get(split, []) if s.file == file), None)
        if info is None:
            return None
        try:
            check_shard_file(self.work.parent / file, info, checksum=True)
        except ShardIntegrityError:
            return None
        return info

    def shard_done(self, split: str, info: ShardInfo) -> None:
        kill_point("shard")
        recorded = [s for s in self.shards.get(split, []) if s.file != info.file]
        self.shards[split] = recorded + [info]
        self._save()

    def _sync_data(self, tokens: BinaryIO) -> None:
        tokens.flush()
        os.fsync(tokens.fileno())
        self.pass1.token_bytes = tokens.tell()
        for name, pending in self._pending.items():
            with open(self.doc_path(name), "ab") as f:
                for values in pending:
                    f.write(memoryview(values))
                f.flush()
                os.fsync(f.fileno())
        self.pass1.num_docs += sum(len(v) for v in self._pending["doc_id"])
        self._pending = {name: [] for name in self.arrays}
        if self._pending_targets:
            with open(self.targets_path, "ab") as f:
                for mask in self._pending_targets:
                    f.write(memoryview(mask))
                f.flush()
                os.fsync(f.fileno())
                self.pass1.target_bytes = f.tell()
            self._pending_targets = []

    def _save(self) -> None:
        raw = {
            "version": JOURNAL_VERSION,
            "fingerprint": self.fingerprint,
            "pass1": self.pass1.to_json(),
            "shards": {s: [asdict(i) for i in infos] for s, infos in self.shards.items()},
        }
        atomic_write_text(self.work / JOURNAL_NAME, json.dumps(raw, indent=1) + "\n")


def _truncate(path: Path, num_bytes: int) -> None:
    size = path.stat().st_size if path.exists() else -1
    if size < num_bytes:
        raise ResumeError(
            f"`{path}` holds {max(size, 0):,} bytes but the journal committed {num_bytes:,}; the work folder"
            " was damaged. Pass `--overwrite` instead of `--resume` to start again."
        )
    with open(path, "r+b") as f:
        f.truncate(num_bytes)
        os.fsync(f.fileno())
    fsync_dir(path.parent)


_FLAGS = {
    "inputs": "inputs",
    "tokenizer": "--tokenizer",
    "tokenizer_sha256": "tokenizer.json (sha256)",
    "seq_len": "--seq-len",
    "strategy": "--strategy",
    "text_field": "--text-field",
    "dataset_split": "--dataset-split",
    "eos_token": "--eos-token",
    "bos_token": "--bos-token",
    "long_docs": "--long-docs",
    "val_fraction": "--val-fraction",
    "skip_invalid": "--skip-invalid",
    "rows_per_shard": "--rows-per-shard",
    "mixture": "the mixture's sources (--recipe/--source)",
    "mixture_plan": "the mixture's shares, epochs and caps",
    "format": "--format",
    "chat_template": "--chat-template",
    "train_on": "--train-on",
    "long_chats": "--long-chats",
}


def describe_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between the interrupted run's fingerprint and this one's."""
    found = []
    for key in sorted(set(before) | set(now)):
        if key == "input_files" or before.get(key) == now.get(key):
            continue
        flag = _FLAGS.get(key, key)
        found.append(f"{flag} was {before.get(key)!r} in the interrupted run, now {now.get(key)!r}")
    old_files = {f["path"]: f for f in before.get("input_files", [])}
    new_files = {f["path"]: f for f in now.get("input_files", [])}
    for path in sorted(set(old_files) | set(new_files)):
        old, new = old_files.get(path), new_files.get(path)
        if old is None:
            found.append(f"input `{path}` is new since the interrupted run")
        elif new is None:
            found.append(f"input `{path}` is gone since the interrupted run")
        elif old != new:
            found.append(
                f"input `{path}` changed since the interrupted run (size {old['size']:,} -> {new['size']:,}"
                " bytes, or modified)"
            )
    return found
