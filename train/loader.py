"""The training data path: memory-mapped packed rows -> shuffled, rank-sharded varlen micro-batches.

Scheme. A split is a list of packed rows (``shared.reader``), each a zero-copy view of a memory-mapped
shard, so opening a dataset reads nothing and resident memory does not grow with its size. Every epoch
the row indices are permuted by a generator seeded with ``(seed, epoch)``, so the order is a pure function
of the seed and the epoch (a resumed run sees the same order without storing it). Rank ``r`` of ``W``
takes every W-th row of that permutation (``perm[r::W]``): the shares are disjoint and cover every row,
and one step of W ranks x 1 micro-batch trains on the same rows as 1 rank x W micro-batches.

Each micro-batch is ``batch_size`` rows concatenated into one flat ``[1, T]`` stream (a
:class:`~train.batch.VarlenBatch`): per-row ``cu_seqlens`` are shifted by the row's offset and joined
into one global ``cu_seqlens``, so attention stays inside each document. Assembling is the only copy of
the tokens (int32, from the page cache), and it is done for a few micro-batches at once
(``train.gather``: a fixed handful of numpy calls per group, whatever its rows).

An epoch is a whole number of optimizer steps: the last ``len(share) % (batch_size * grad_accum)`` rows of
each rank's share are left out of that epoch (a different, random set each epoch; ``train plan`` prints
the count). The position ``(epoch, batch_in_epoch)`` of the next micro-batch is the loader's whole state.

Resuming on another number of ranks. Step ``s`` of an epoch trains on exactly the rows
``perm[s*G : (s+1)*G]`` with ``G = batch_size * grad_accum * world_size`` rows per step, however those
rows are dealt to ranks and micro-batches (rank r's micro-batch k holds ``perm[r + W*(k*B + j)]``), and
an epoch has ``floor(num_rows / G)`` steps. So the saved position is world-size free: global rows
consumed in the epoch. A run may resume with another ``world_size`` (or ``batch_size``/``grad_accum``)
as long as ``G`` stays the same (2 ranks x grad_accum 1 -> 1 rank x grad_accum 2); the losses are then
the same up to summation order.

A background thread assembles groups of micro-batches (about ``HANDOFF_TOKENS`` tokens each) ahead of
the training step and hands each group over at once, because every hand-over wakes a sleeping thread
and that wake-up costs more than assembling a small micro-batch. Where a group's memory comes from,
and how it reaches the device, is :func:`assembly_for`'s business (a pool on the CPU, a pinned ring
on CUDA); the loader only orders rows, keeps the position and runs the thread.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.random  # noqa: F401  (numpy loads it lazily, inside the first batch's time)
import torch

from shared.errors import UserError
from shared.reader import RowViews, Split
from train.batch import VarlenBatch
from train.gather import Layout, TokenPool, batch_from_rows, cpu_batches, fill, group_sizes, split_batches

__all__ = ["Loader", "batch_from_rows", "sequential_batches"]

PREFETCH = 2
"""Groups of micro-batches assembled ahead of the one being trained on."""
HANDOFF_TOKENS = 65_536
"""Tokens (at the longest rows) per group handed over by the prefetch thread; 1 to MAX_GROUP batches
(the group sizes compared are in benchmarks/NOTES.md, "Loader mechanisms")."""
MAX_GROUP = 8


@dataclass(slots=True)
class _HostBuffers:
    """Preallocated (pinned on CUDA) int32 host memory a group is staged in, reused round-robin: its
    ``3 x TT`` tokens, then its cu_seqlens right behind them, so that one copy moves the group."""

    data: torch.Tensor
    array: np.ndarray
    """``data`` seen by numpy (made once: ``Tensor.numpy`` costs microseconds per call)."""
    num_tokens: int
    """Capacity in tokens; the cu_seqlens of a group have at most tokens + batches entries."""
    copied: Any = None
    """CUDA event recorded after this buffer's copy to the GPU; wait on it before refilling."""

    @classmethod
    def allocate(cls, num_tokens: int, num_batches: int, pin: bool) -> _HostBuffers:
        data = torch.empty(4 * num_tokens + num_batches, dtype=torch.int32, pin_memory=pin)
        return cls(data=data, array=data.numpy(), num_tokens=num_tokens)


@dataclass(frozen=True, slots=True)
class _Staged:
    """A group staged in ``buffers``, waiting for its copy to the device."""

    buffers: _HostBuffers
    layout: Layout


def _stage(views: RowViews, batch_size: int, out: _HostBuffers) -> _Staged:
    """The group's rows into ``out``, int32 as stored: the host half of the CUDA path."""
    starts = group_sizes(views, batch_size)
    num_tokens, num_cu = starts[0][-1], starts[1][-1]
    if num_tokens > out.num_tokens:
        raise ValueError(f"buffers hold {out.num_tokens} tokens, the rows need {num_tokens}")
    tokens = out.array[: 3 * num_tokens]
    cu_seqlens = out.array[3 * num_tokens : 3 * num_tokens + num_cu]
    return _Staged(out, fill(views, batch_size, starts, tokens, cu_seqlens))


def _unstage(staged: _Staged, device: torch.device) -> list[VarlenBatch]:
    """Copy a staged group to ``device`` in one transfer, cast its tokens to int64 there, split it."""
    layout, buffers = staged.layout, staged.buffers
    num_tokens = layout.num_tokens
    data = buffers.data[: 3 * num_tokens + layout.num_cu].to(device, non_blocking=True)
    buffers.copied = torch.cuda.Event()
    buffers.copied.record()
    return split_batches(data[: 3 * num_tokens].to(torch.int64), data[3 * num_tokens :], layout)


class _PooledAssembly:
    """CPU micro-batches (int64) in buffers of a :class:`~train.gather.TokenPool`; a plain copy to a
    device other than the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Groups not yet handed out at most: queued, the producer's next, the consumer's current; plus
        # a few whose batches the caller keeps (gradient accumulation, say) before a fresh buffer is made.
        self.pool = TokenPool(PREFETCH + 4)

    def host(self, views: RowViews, batch_size: int, group: int) -> list[VarlenBatch]:
        return cpu_batches(views, batch_size, self.pool)

    def to_device(self, batches: list[VarlenBatch]) -> list[VarlenBatch]:
        if self.device.type == "cpu":
            return batches
        return [b.to(self.device) for b in batches]


class _PinnedAssembly:
    """CUDA: each group staged int32 into the next buffer of a ring of pinned host buffers, copied to
    the GPU in one ``non_blocking`` transfer and cast to int64 there. A CUDA event per buffer keeps it
    from being refilled before its copy has finished."""

    def __init__(self, device: torch.device, ring: list[_HostBuffers]) -> None:
        self.device = device
        self.ring = ring

    def host(self, views: RowViews, batch_size: int, group: int) -> _Staged:
        buffers = self.ring[group % len(self.ring)]
        if buffers.copied is not None:
            buffers.copied.synchronize()
        return _stage(views, batch_size, buffers)

    def to_device(self, staged: _Staged) -> list[VarlenBatch]:
        return _unstage(staged, self.device)


def assembly_for(
    device: torch.device, *, group_size: int, batch_tokens: int
) -> _PooledAssembly | _PinnedAssembly:
    """How the loader's groups are built on the host (``host``, in the prefetch thread) and moved to
    ``device`` (``to_device``, in the training thread): the one place the device decides anything.

    Each path is kept for a figure in benchmarks/NOTES.md, "Loader mechanisms": the CPU pool because
    assembling into fresh buffers is measurably slower than into reused ones. The CUDA ring has no such
    figure yet (the GPU loader was never timed apart from the step; see "What is not measured here"):
    it is the standard pinned, asynchronous copy, kept until a GPU run shows it does not pay.
    """
    if device.type != "cuda":
        return _PooledAssembly(device)
    # Groups staged but not yet copied at most: queued, and the one the producer waits to put. A ring
    # one longer never refills an uncopied buffer (and waits for the copy of the one it refills).
    ring = [
        _HostBuffers.allocate(group_size * batch_tokens, group_size, pin=True) for _ in range(PREFETCH + 2)
    ]
    return _PinnedAssembly(device, ring)


def _longest_row(split: Split) -> int:
    """Tokens in the split's longest row at most: the ``seq_len`` its shards were packed at (each checked
    on open against the manifest), without reading an offset per row; else measured."""
    seq_lens = [shard.metadata.get("seq_len") for shard in split.shards]
    if seq_lens and all(isinstance(n, int) and n > 0 for n in seq_lens):
        return max(seq_lens)
    return int(split.row_lengths().max())


class Loader:
    """An endless stream of shuffled micro-batches for one rank, resumable from :meth:`state_dict`.

    Use as ``batch = next(loader)``; call :meth:`close` (or use ``with``) to stop the prefetch thread.
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        seed: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        max_row_tokens: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.split = split
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        share = split.num_rows // world_size
        rows_per_step = batch_size * grad_accum
        self.batches_per_epoch = share // rows_per_step * grad_accum
        if self.batches_per_epoch == 0:
            raise UserError(
                f"the `{split.name}` split has {split.num_rows:,} rows: too few for one step of"
                f" {rows_per_step} rows per rank x {world_size} ranks; lower --batch-size or --grad-accum."
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        batch_tokens = batch_size * (max_row_tokens or _longest_row(split))
        self.group_size = max(1, min(MAX_GROUP, HANDOFF_TOKENS // batch_tokens))
        """Micro-batches assembled and handed over together."""
        self._assembly = assembly_for(self.device, group_size=self.group_size, batch_tokens=batch_tokens)
        self._queue: queue.Queue | None = None
        self._ready: collections.deque = collections.deque()
        """Micro-batches of the last hand-over not yet given out."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- order -------------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every row index of the split, in the order of ``epoch`` (the same on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.split.num_rows)

    def rank_rows(self, epoch: int) -> np.ndarray:
        """This rank's share of ``epoch``: every ``world_size``-th row of the epoch order."""
        return self.epoch_order(epoch)[self.rank :: self.world_size]

    def batch_rows(self, epoch: int, index: int) -> np.ndarray:
        """Row indices of micro-batch ``index`` of ``epoch`` on this rank."""
        lo = index * self.batch_size
        return self.rank_rows(epoch)[lo : lo + self.batch_size]

    # -- position ----------------------------------------------------------------------------------

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step over all ranks: what an epoch's order is cut into."""
        return self.batch_size * self.grad_accum * self.world_size

    def state_dict(self) -> dict[str, int]:
        """Position of the next micro-batch to be handed out, and what it is relative to.

        ``rows_in_epoch`` (global rows consumed in the epoch) is the world-size-free position that
        :meth:`load_state_dict` reads; ``batch_in_epoch`` is this rank's count, kept for inspection.
        """
        return {
            "epoch": self.epoch,
            "rows_in_epoch": self.batch_in_epoch * self.batch_size * self.world_size,
            "rows_per_step": self.rows_per_step,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
            "num_rows": self.split.num_rows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``, saved by a loader with the same seed, rows and rows per step (its
        world size, batch size and grad accumulation may differ; see the module docstring)."""
        for key in ("seed", "num_rows"):
            if state.get(key) != self.state_dict()[key]:
                raise UserError(
                    f"the checkpoint's data position was taken with {key}={state.get(key)!r}, this run has"
                    f" {key}={self.state_dict()[key]!r}; resume with the same --seed and dataset, or start"
                    " a new --out."
                )
        if "rows_in_epoch" in state:
            rows_in_epoch, rows_per_step = int(state["rows_in_epoch"]), int(state["rows_per_step"])
        else:  # written before positions were world-size free
            rows_in_epoch = int(state["batch_in_epoch"]) * state["batch_size"] * state["world_size"]
            rows_per_step = state["batch_size"] * state["grad_accum"] * state["world_size"]
        rows_per_batch = self.batch_size * self.world_size
        if rows_per_step != self.rows_per_step or rows_in_epoch % rows_per_batch:
            saved = (
                f"batch_size {state.get('batch_size')} x grad_accum {state.get('grad_accum')}"
                f" x {state.get('world_size')} ranks = {rows_per_step} rows per step"
            )
            mine = (
                f"batch_size {self.batch_size} x grad_accum {self.grad_accum} x {self.world_size} ranks"
                f" = {self.rows_per_step}"
            )
            raise UserError(
                f"the checkpoint was trained with {saved}; this run has {mine}. A run resumes only with"
                " the same rows per step: set --batch-size and --grad-accum so that batch_size x"
                " grad_accum x ranks (torchrun --nnodes x --nproc-per-node) is the same, e.g. 2 ranks"
                " x --grad-accum 1 -> 1 rank x --grad-accum 2; or start a new --out."
            )
        self._shutdown()
        self.epoch, self.batch_in_epoch = int(state["epoch"]), rows_in_epoch // rows_per_batch

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[VarlenBatch]:
        return self

    def __next__(self) -> VarlenBatch:
        if self._thread is None:
            self._start()
        if not self._ready:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._shutdown()
                raise item
            positions, group = item
            self._ready.extend(zip(positions, self._assembly.to_device(group), strict=True))
        (epoch, index), batch = self._ready.popleft()
        assert (epoch, index) == (self.epoch, self.batch_in_epoch), "prefetch out of order"
        self.epoch, self.batch_in_epoch = self._advance(epoch, index)
        return batch

    def _advance(self, epoch: int, index: int) -> tuple[int, int]:
        index += 1
        return (epoch + 1, 0) if index == self.batches_per_epoch else (epoch, index)

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=PREFETCH)
        self._ready.clear()
        self._thread = threading.Thread(target=self._produce, name="loader-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        epoch, index = self.epoch, self.batch_in_epoch
        order, order_epoch = None, None
        num_groups = 0
        try:
            while not self._stop.is_set():
                positions, indices = [], []
                for _ in range(self.group_size):
                    if order_epoch != epoch:
                        order, order_epoch = self.rank_rows(epoch), epoch
                    lo = index * self.batch_size
                    indices += order[lo : lo + self.batch_size].tolist()
                    positions.append((epoch, index))
                    epoch, index = self._advance(epoch, index)
                group = self._assembly.host(self.split.views(indices), self.batch_size, num_groups)
                num_groups += 1
                if not self._put((positions, group)):
                    return
                del group  # so that the pool sees the group's buffer free once the caller drops it
        except BaseException as e:  # handed to the consumer, which re-raises it in the training thread
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def close(self) -> None:
        self._shutdown()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sequential_batches(
    split: Split, *, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[VarlenBatch]:
    """Every row of this rank's share (``rank::world_size``) in stored order, last batch possibly short:
    for evaluation, where every row counts once and order does not matter."""
    indices = np.arange(rank, split.num_rows, world_size)
    for lo in range(0, len(indices), batch_size):
        yield batch_from_rows([split.row(int(i)) for i in indices[lo : lo + batch_size]])
