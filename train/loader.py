"""The training data path: memory-mapped packed rows -> shuffled, rank-sharded varlen micro-batches.

Scheme. A split is a list of packed rows (``shared.reader``), each a zero-copy view of a memory-mapped
shard, so opening a dataset reads nothing and resident memory does not grow with its size. Every epoch
the row indices are permuted by a generator seeded with ``(seed, epoch)``, so the order is a pure function
of the seed and the epoch (a resumed run sees the same order without storing it). Rank ``r`` of ``W``
takes every W-th row of that permutation (``perm[r::W]``): the shares are disjoint and cover every row,
and one step of W ranks x 1 micro-batch trains on the same rows as 1 rank x W micro-batches.

Each micro-batch is ``batch_size`` rows concatenated into one flat ``[1, T]`` stream (a
:class:`~train.batch.VarlenBatch`): per-row ``cu_seqlens`` are shifted by the row's offset and joined
into one global ``cu_seqlens``, so attention stays inside each document. Assembling a micro-batch is the
only copy: the rows' tokens (int32, from the page cache) into int64 tensors of ``T`` entries.

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

On CUDA, rows are gathered into a small ring of pinned host buffers by a background thread while the
current step runs, then copied to the GPU with ``non_blocking=True``; a CUDA event per buffer keeps a
buffer from being refilled before its copy has finished. On CPU the assembled tensors are the batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.contract import IGNORE_INDEX
from shared.errors import InvariantError, UserError
from shared.reader import PackedRow, Split
from train.batch import VarlenBatch

PREFETCH = 2
"""Micro-batches assembled ahead of the one being trained on."""


@dataclass(slots=True)
class _HostBuffers:
    """Preallocated (pinned on CUDA) host tensors a micro-batch is assembled into, reused round-robin."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    copied: Any = None
    """CUDA event recorded after this buffer's copy to the GPU; wait on it before refilling."""

    @classmethod
    def allocate(cls, num_tokens: int, pin: bool) -> _HostBuffers:
        def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(n, dtype=dtype, pin_memory=pin)

        return cls(
            input_ids=empty(num_tokens, torch.int64),
            labels=empty(num_tokens, torch.int64),
            position_ids=empty(num_tokens, torch.int64),
            # a segment holds at least one token, so a micro-batch has at most num_tokens segments
            cu_seqlens=empty(num_tokens + 1, torch.int32),
        )


def batch_from_rows(rows: Sequence[PackedRow], out: _HostBuffers | None = None) -> VarlenBatch:
    """Concatenate packed rows into one varlen micro-batch (on the CPU).

    With ``out``, the tensors are views of those preallocated buffers (valid until they are refilled);
    without, they are freshly allocated.
    """
    if not rows:
        raise ValueError("a micro-batch needs at least one row")
    ids = [r.input_ids for r in rows]
    cus = [r.cu_seqlens for r in rows]
    row_len = np.fromiter(map(len, ids), dtype=np.int64, count=len(rows))
    row_segs = np.fromiter(map(len, cus), dtype=np.int64, count=len(rows)) - 1
    num_tokens = int(row_len.sum())
    num_segments = int(row_segs.sum())
    cu_all = np.concatenate(cus)
    # Every row's cu_seqlens must run from 0 to its length; the shard reader already checked the counts.
    last = np.cumsum(row_segs + 1) - 1
    first = last - row_segs
    if (cu_all[first] != 0).any() or (cu_all[last] != row_len).any() or (row_segs < 1).any():
        i = int(np.flatnonzero((cu_all[first] != 0) | (cu_all[last] != row_len) | (row_segs < 1))[0])
        raise InvariantError(
            f"row {i} of the micro-batch has cu_seqlens {cus[i][:4].tolist()}...{cus[i][-1:].tolist()} for"
            f" {row_len[i]} tokens; run `prep verify` on the dataset."
        )
    if out is None:
        out = _HostBuffers.allocate(num_tokens, pin=False)
    elif out.input_ids.numel() < num_tokens:
        raise ValueError(f"buffers hold {out.input_ids.numel()} tokens, the rows need {num_tokens}")
    input_ids = out.input_ids[:num_tokens]
    labels = out.labels[:num_tokens]
    position_ids = out.position_ids[:num_tokens]
    cu_seqlens = out.cu_seqlens[: num_segments + 1]
    labels_np = labels.numpy()
    np.concatenate(ids, out=input_ids.numpy())
    np.concatenate([r.labels for r in rows], out=labels_np)
    np.concatenate([r.position_ids for r in rows], out=position_ids.numpy())
    # Each row's segment starts, shifted by where the row begins in the stream, then the stream's end.
    row_start = np.cumsum(row_len) - row_len
    cu_np = cu_seqlens.numpy()
    keep = np.ones(len(cu_all), dtype=bool)
    keep[last] = False
    cu_np[:-1] = cu_all[keep] + np.repeat(row_start, row_segs)
    cu_np[-1] = num_tokens
    return VarlenBatch(
        input_ids=input_ids.view(1, num_tokens),
        labels=labels.view(1, num_tokens),
        position_ids=position_ids.view(1, num_tokens),
        cu_seqlens=cu_seqlens,
        max_seqlen=int(np.diff(cu_np).max()),
        num_target_tokens=num_tokens - int(np.count_nonzero(labels_np == IGNORE_INDEX)),
    )


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
        self._staged = self.device.type == "cuda"
        self._ring: list[_HostBuffers] = []
        if self._staged:
            capacity = batch_size * (max_row_tokens or int(split.row_lengths().max()))
            self._ring = [_HostBuffers.allocate(capacity, pin=True) for _ in range(PREFETCH + 2)]
        self._queue: queue.Queue | None = None
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
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        (epoch, index), batch, buffers = item
        assert (epoch, index) == (self.epoch, self.batch_in_epoch), "prefetch out of order"
        if buffers is not None:
            batch = batch.to(self.device, non_blocking=True)
            buffers.copied = torch.cuda.Event()
            buffers.copied.record()
        elif self.device.type != "cpu":  # another accelerator: a plain copy
            batch = batch.to(self.device)
        self.epoch, self.batch_in_epoch = self._advance(epoch, index)
        return batch

    def _advance(self, epoch: int, index: int) -> tuple[int, int]:
        index += 1
        return (epoch + 1, 0) if index == self.batches_per_epoch else (epoch, index)

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=PREFETCH)
        self._thread = threading.Thread(target=self._produce, name="loader-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        epoch, index = self.epoch, self.batch_in_epoch
        order, order_epoch = None, None
        count = 0
        try:
            while not self._stop.is_set():
                if order_epoch != epoch:
                    order, order_epoch = self.rank_rows(epoch), epoch
                lo = index * self.batch_size
                rows = [self.split.row(int(i)) for i in order[lo : lo + self.batch_size]]
                buffers = None
                if self._staged:
                    buffers = self._ring[count % len(self._ring)]
                    if buffers.copied is not None:
                        buffers.copied.synchronize()
                batch = batch_from_rows(rows, buffers)
                count += 1
                if not self._put(((epoch, index), batch, buffers)):
                    return
                epoch, index = self._advance(epoch, index)
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
