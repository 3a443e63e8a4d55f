"""What `prep pack` says when the machine, not the data, stops it: a full disk, an `--out` it cannot write, a
tokenizing worker killed (most often by the kernel's out-of-memory killer).

Each becomes a :class:`~shared.errors.UserError` naming the cause and how to go on. The journal
(`prep/journal.py`) commits only after its data is synced and writes every file under a temporary name, so
a run stopped by any of them leaves a work folder that `--resume` finishes once the cause is fixed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from prep.journal import JOURNAL_NAME, TOKENS_NAME
from shared.contract import MANIFEST_NAME
from shared.errors import UserError

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
CANNOT_WRITE = (
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
    errno.ENAMETOOLONG,
    errno.EIO,
)


class ResumableError(UserError):
    """The run stopped for a reason outside the data: its work folder is kept for `--resume`."""


class WorkerDiedError(ResumableError):
    """A tokenizing worker process died (killed by a signal, most often the out-of-memory killer)."""


def resume_hint(out: Path) -> str:
    return f"then run the same `prep pack` command with `--resume` to continue in `{out}`: no finished work is lost"


def output_error(e: OSError, out: Path, work: Path) -> UserError | None:
    """The error to show for an OS error while `prep pack` wrote ``out``; None for one it does not know.

    ``work``: the run's work folder (resumable when it exists).
    """
    where = f" (`{e.filename}`)" if e.filename and Path(e.filename) != out else ""
    if (out / MANIFEST_NAME).is_file():
        # Only the data card was left (the manifest is written after every shard, and this run removed any
        # older one before it started): the dataset itself is complete and verified by its manifest.
        return UserError(
            f"the dataset in `{out}` is complete, but its data card could not be written ({e.strerror}{where})."
            f" Fix that (free space, permissions), then run `prep card {out}` to write it."
        )
    resumable = work.is_dir()
    if e.errno in OUT_OF_SPACE:
        free, needed = _free_bytes(out), _bytes_still_needed(work)
        room = f"{_size(free)} free" if free is not None else "free space unknown"
        need = f"; the run needs about {_size(needed)} more to finish" if needed else ""
        then = f"; {resume_hint(out)}" if resumable else ", then run the command again"
        return UserError(
            f"no space left on the disk holding --out `{out}` ({e.strerror}{where}; {room}{need}). Free some"
            f" space{then}. Or start again with an --out on a larger disk."
        )
    if e.errno in CANNOT_WRITE:
        blocker = _file_in_the_way(out)
        why = f"`{blocker}` is a file, not a folder" if blocker is not None else f"{e.strerror}{where}"
        then = f"; {resume_hint(out)}" if resumable else ""
        return UserError(
            f"cannot write to --out `{out}`: {why}. Choose an --out you can write to (on a writable disk), or"
            f" fix the permissions{then}."
        )
    return None


def _bytes_still_needed(work: Path) -> int | None:
    """About what the shards still take once every document is tokenized: three int32 columns per token
    of the token store, less the shards already recorded; None while tokenizing (the total is unknown)."""
    try:
        journal = json.loads((work / JOURNAL_NAME).read_text(encoding="utf-8"))
        if not journal["pass1"]["done"]:
            return None
        written = sum(s["num_bytes"] for infos in journal["shards"].values() for s in infos)
        return max(0, 3 * (work / TOKENS_NAME).stat().st_size - written)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _file_in_the_way(out: Path) -> Path | None:
    """The first part of ``out`` that exists and is not a folder (`--out some_file/sub`), if any."""
    for part in (*reversed(out.parents), out):
        if part.exists() and not part.is_dir():
            return part
        if not part.exists():
            return None
    return None


def _free_bytes(out: Path) -> int | None:
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing or os.curdir).free
    except OSError:
        return None


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


def worker_died(workers: int) -> WorkerDiedError:
    return WorkerDiedError(
        "a tokenizing worker process died while `prep pack` ran; the usual cause is the kernel's"
        " out-of-memory killer (too many workers for this machine's memory, or one huge document). Pass a"
        f" lower `--workers` (this run used {workers}) or split very large documents, then run the same"
        " command with `--resume` to continue from the last committed batch."
    )
