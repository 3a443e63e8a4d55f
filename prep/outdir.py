"""The output folder of `prep pack`: one run at a time, and only the files a run wrote are ever removed.

**One run at a time.** A run holds an exclusive ``fcntl.flock`` on ``OUT/.pack-lock`` from before it looks at
the folder until it ends, with ``--resume`` and ``--overwrite`` too; under ``--executor ray`` the driver holds
it while the tasks write. A second run is refused at once, naming the holder (pid, host, start time, which
the holder writes into the file). The kernel drops the lock when its process exits, however it exits, so a
lock file left by a killed run is stale by construction and the next run simply takes it. The holder
removes the file as it ends; a run that locked a file already unlinked that way locks the new one instead.

**Only our files.** `prep pack` writes these names into ``--out`` and no others: shards
(``train-00000-of-00004.arrow``), ``manifest.json``, the card ``README.md`` and ``card_lengths.png``, their
temporary files ``.NAME.tmp-PID``, the work folder ``.pack-work`` and the lock. Which of them a folder's
files are, for ``--overwrite``:

- a folder with a work folder holds an interrupted run: every file under one of those names is that run's
  (the run started on a folder holding none of them; the checks below make sure of it);
- otherwise the manifest names them: its shards, itself, and the card and plot when ``README.md`` is the
  card `prep pack` writes for that manifest.

Anything else stays. A file the manifest does not name under a name the new run writes (a user's own
``README.md``, a stray shard) is refused rather than written over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prep.card import PLOT_NAME, is_card_of
from prep.faults import output_error
from shared.contract import CARD_NAME, MANIFEST_NAME, SHARD_SUFFIX, SPLITS
from shared.errors import DatasetError, UserError
from shared.manifest import Manifest

LOCK_NAME = ".pack-lock"
WORK_DIR = ".pack-work"
_SHARD = re.compile(rf"(?:{'|'.join(SPLITS)})-\d{{5}}-of-\d{{5}}{re.escape(SHARD_SUFFIX)}")
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-\d+")
"""Temporary names of shared.fileio.temp_path_for."""


class OutputBusyError(UserError):
    """Another `prep pack` run holds the output folder."""


def is_pack_file(name: str) -> bool:
    """Whether `prep pack` writes a file of this name into ``--out`` (the lock and work folder aside)."""
    return name in (MANIFEST_NAME, CARD_NAME, PLOT_NAME) or _SHARD.fullmatch(name) is not None


def _is_pack_temp(name: str) -> bool:
    temp = _TEMP.fullmatch(name)
    return temp is not None and is_pack_file(temp["name"])


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the ``with`` block, creating ``out`` if needed (and removing it again if the
    run leaves it empty, as a run stopped by a user mistake does)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out `{out}` is a file; pass a folder.")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = output_error(e, out, out / WORK_DIR)
        raise error or UserError(
            f"cannot create --out `{out}` ({e.strerror}); choose a folder you can write to."
        ) from e
    path = out / LOCK_NAME
    fd = _acquire(path, out)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # unlinked while still locked: see the module docstring
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote a dataset or left work to resume
                out.rmdir()


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"cannot write into --out `{out}` ({e.strerror}); choose a folder you can write to."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"--out `{out}` is in use by another `prep pack` run ({holder}); two runs on one folder"
                " would corrupt it. Wait for that run to end, or stop it (its lock goes with it; `--resume`"
                " then finishes its work), and run again."
            ) from None
        except OSError as e:
            os.close(fd)
            raise UserError(
                f"cannot lock `{path}` ({e.strerror}); the file system of --out does not support locks."
                " Choose an --out on a local disk."
            ) from e
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the previous holder removed this file as it ended: lock the one now at the path
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": shlex.join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0))
        return f"pid {int(holder['pid'])} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not written its pid yet"  # it took the lock a moment ago


def refuse_overlap(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``out`` that is, holds or lies inside an input (symlinks resolved): packing would write
    into the input, a later run would read the dataset as input, or ``--overwrite`` could remove it."""
    out_real = out.resolve()
    for path in inputs:
        real = path.resolve()
        if real == out_real:
            raise UserError(f"--out `{out}` is the input `{path}`; choose another --out for the dataset.")
        if real in out_real.parents:
            raise UserError(
                f"--out `{out}` lies inside the input folder `{path}`; choose an --out outside every input."
            )
        if out_real in real.parents:
            raise UserError(
                f"--out `{out}` holds the input `{path}`; choose an --out that holds no input, or move the"
                " input out of it."
            )


def prepare_output_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check what ``out`` holds before a run (under its lock); with ``overwrite``, remove the old dataset."""
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    work = out / WORK_DIR
    if resume and work.is_dir():
        _remove(out, sorted(n for n in names if _is_pack_temp(n)))  # the journal decides the rest
        return
    if not names:
        return
    if not work.is_dir() and not (out / MANIFEST_NAME).is_file():
        raise UserError(
            f"--out `{out}` is a non-empty folder that is not a dataset; choose an empty or new folder."
        )
    if not overwrite and work.is_dir():
        raise UserError(
            f"--out `{out}` holds an interrupted pack ({WORK_DIR}); pass `--resume` to finish it, or"
            " `--overwrite` to start again."
        )
    if not overwrite:
        done = " (it is complete: there is nothing to resume)" if resume else ""
        raise UserError(f"--out `{out}` already holds a dataset{done}; pass `--overwrite` to replace it.")
    ours = _pack_files(out, names)
    clashes = sorted(n for n in names - ours if is_pack_file(n))
    if clashes:
        card = {CARD_NAME, PLOT_NAME} & set(clashes)
        raise UserError(
            f"--out `{out}` holds {', '.join(f'`{n}`' for n in clashes)}, which the new pack would write"
            " over and which the manifest there does not name"
            + (
                f" ({CARD_NAME} is the data card, and {PLOT_NAME} its plot, only while {CARD_NAME} starts"
                " with the front matter `prep pack` wrote for that manifest)"
                if card
                else ""
            )
            + f". Move {'it' if len(clashes) == 1 else 'them'} out of the folder, or choose another --out."
        )
    # The work folder first: an overwrite cut short leaves an interrupted pack, which --overwrite clears.
    work.mkdir(exist_ok=True)
    _remove(out, sorted(ours, key=lambda n: n != MANIFEST_NAME))  # the manifest first: no half dataset


def _pack_files(out: Path, names: set[str]) -> set[str]:
    """The files in ``out`` (besides the work folder) that `prep pack` wrote; see the module docstring."""
    if (out / WORK_DIR).is_dir():
        return {n for n in names if is_pack_file(n) or _is_pack_temp(n)}
    try:
        manifest = Manifest.load(out)
    except DatasetError as e:
        raise UserError(
            f"`--overwrite` removes only the files the manifest in `{out}` names, and it cannot be read: {e}"
            f" Empty `{out}` yourself (or choose another --out), then run `prep pack` again."
        ) from e
    shards = {s.file for split in manifest.splits.values() for s in split.shards}
    ours = {MANIFEST_NAME} | {n for n in shards if _SHARD.fullmatch(n)}
    if is_card_of(out / CARD_NAME, manifest):
        ours |= {CARD_NAME, PLOT_NAME}
    ours |= {n for n in names if _is_pack_temp(n)}
    return ours & names


def _remove(out: Path, names: Iterable[str]) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)
