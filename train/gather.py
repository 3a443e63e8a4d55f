"""Packed rows -> varlen micro-batches, several at once, in a fixed handful of numpy calls.

Why it is shaped this way. Copying a micro-batch's tokens costs about as much as a few numpy or
torch calls, so per-row Python (an object per row, a dozen small calls per batch, three concatenations
with a cast) cost more than the copy itself (benchmarks/NOTES.md, "Loader mechanisms"). So a *group* of
micro-batches is assembled in one go, with a number of calls that grows with neither rows nor batches:

- the rows are zero-copy slices of the mapped shards (``Split.views``: offsets read as Python ints);
- every token column of every row goes into one buffer in one ``np.concatenate``, column by column::

      tokens  [ input_ids of batch 0, 1, ... | labels of batch 0, 1, ... | position_ids ... ]   (3 x TT)

- every batch's ``cu_seqlens`` goes into one buffer, one batch after another, in one concatenate and
  one add: each row's segment starts, shifted by where the row begins in its batch, and after a
  batch's last row that row's end, which is the batch's length;
- ``max_seqlen`` and ``num_target_tokens`` of every batch come from one ``reduceat`` each.

Batch ``g`` is then views: ``tokens[:, a_g:a_g + T_g]`` (its three columns) and
``cu_seqlens[c_g:c_g + S_g + 1]``. On the CUDA path the buffers are int32 (the shards' dtype) in
pinned memory and the group crosses to the GPU in one copy, cast to int64 there.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.contract import IGNORE_INDEX
from shared.errors import InvariantError
from shared.reader import PackedRow, RowViews
from train.batch import VarlenBatch


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each micro-batch of a group lies in the group's buffers, and its scalars."""

    token_starts: list[int]
    """Batch g's tokens are columns ``token_starts[g]:token_starts[g+1]``; the last entry is TT."""
    cu_starts: list[int]
    """Batch g's cu_seqlens are ``cu_starts[g]:cu_starts[g+1]``; the last entry is the buffer's length."""
    max_seqlen: list[int]
    num_target_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return self.token_starts[-1]

    @property
    def num_cu(self) -> int:
        return self.cu_starts[-1]


def group_sizes(views: RowViews, batch_size: int) -> tuple[list[int], list[int]]:
    """``(token_starts, cu_starts)`` of the micro-batches of ``batch_size`` consecutive rows each."""
    num_rows = len(views.num_tokens)
    if num_rows == 0 or num_rows % batch_size:
        raise ValueError(f"{num_rows} rows do not make micro-batches of {batch_size} rows")
    tokens, segments = views.num_tokens, views.num_segments
    per_batch = range(0, num_rows, batch_size)
    token_starts = itertools.accumulate((sum(tokens[r : r + batch_size]) for r in per_batch), initial=0)
    cu_starts = itertools.accumulate((sum(segments[r : r + batch_size]) + 1 for r in per_batch), initial=0)
    return list(token_starts), list(cu_starts)


def fill(
    views: RowViews,
    batch_size: int,
    starts: tuple[list[int], list[int]],
    tokens: np.ndarray,
    cu_seqlens: np.ndarray,
) -> Layout:
    """Write the micro-batches into ``tokens`` (``3 x TT`` entries) and ``cu_seqlens`` (every batch's,
    back to back); ``starts`` is :func:`group_sizes`'s answer."""
    token_starts, cu_starts = starts
    total = token_starts[-1]
    np.concatenate(views.input_ids + views.labels + views.position_ids, out=tokens)
    pieces = [cu[:-1] for cu in views.cu_seqlens]
    counts = list(views.num_segments)
    row_starts: list[int] = []
    for first in range(0, len(pieces), batch_size):
        last = first + batch_size - 1
        pieces[last], counts[last] = views.cu_seqlens[last], counts[last] + 1
        row_starts += itertools.accumulate(views.num_tokens[first:last], initial=0)
    np.concatenate(pieces, out=cu_seqlens)
    cu_seqlens += np.repeat(np.array(row_starts, dtype=np.int32), counts)
    # Between two batches the difference is 0 - T < 0: never a batch's maximum.
    lengths = np.subtract(cu_seqlens[1:], cu_seqlens[:-1])
    max_seqlen = np.maximum.reduceat(lengths, cu_starts[:-1]).tolist()
    # One comparison, then a count per batch (count_nonzero on bools is cheaper than reduceat's cast).
    targets = tokens[total : 2 * total] != IGNORE_INDEX
    num_targets = [
        np.count_nonzero(targets[a:b]) for a, b in zip(token_starts[:-1], token_starts[1:], strict=True)
    ]
    return Layout(token_starts, cu_starts, max_seqlen, num_targets)


def split_batches(tokens: torch.Tensor, cu_seqlens: torch.Tensor, layout: Layout) -> list[VarlenBatch]:
    """The group's micro-batches as views of ``tokens`` (``3 x TT``, any device) and ``cu_seqlens``."""
    tokens = tokens.view(3, 1, layout.num_tokens)
    t, c = layout.token_starts, layout.cu_starts
    batches = []
    for g in range(len(t) - 1):
        input_ids, labels, position_ids = tokens[:, :, t[g] : t[g + 1]].unbind(0)
        batches.append(
            VarlenBatch(
                input_ids=input_ids,
                labels=labels,
                position_ids=position_ids,
                cu_seqlens=cu_seqlens[c[g] : c[g + 1]],
                max_seqlen=layout.max_seqlen[g],
                num_target_tokens=layout.num_target_tokens[g],
            )
        )
    return batches


class TokenPool:
    """int64 host buffers for CPU micro-batches, each refilled only once nothing refers to it any more.

    A CPU batch is handed to the caller, who may keep it (a list of batches, autograd's saved inputs), so
    a buffer cannot simply be reused round-robin. A fresh buffer per group is safe, but its pages fault
    in on first write, which slows assembly (benchmarks/NOTES.md, "Loader mechanisms"). The batches'
    tensors come from ``torch.from_numpy``, whose storage holds a reference to the buffer until the last
    view of it is freed; so a buffer whose only reference is the pool's own is free to refill.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._buffers: list[np.ndarray] = []

    def take(self, num_elements: int) -> np.ndarray:
        for i in range(len(self._buffers)):
            # Counted references: the list's and getrefcount's argument; any other is a live batch's.
            if sys.getrefcount(self._buffers[i]) == 2:
                if len(self._buffers[i]) < num_elements:
                    self._buffers[i] = np.empty(num_elements, dtype=np.int64)
                return self._buffers[i][:num_elements]
        fresh = np.empty(num_elements, dtype=np.int64)
        if len(self._buffers) < self.size:
            self._buffers.append(fresh)
        return fresh[:num_elements]


def cpu_batches(views: RowViews, batch_size: int, pool: TokenPool | None = None) -> list[VarlenBatch]:
    """The rows as CPU micro-batches of ``batch_size`` rows (int64 tokens, as the model and loss take
    them), in fresh memory or in a buffer of ``pool`` that no earlier batch still uses."""
    starts = group_sizes(views, batch_size)
    num_tokens, num_cu = starts[0][-1], starts[1][-1]
    tokens = np.empty(3 * num_tokens, dtype=np.int64) if pool is None else pool.take(3 * num_tokens)
    cu_seqlens = np.empty(num_cu, dtype=np.int32)
    layout = fill(views, batch_size, starts, tokens, cu_seqlens)
    return split_batches(torch.from_numpy(tokens), torch.from_numpy(cu_seqlens), layout)


def checked_views(rows: Sequence[PackedRow]) -> RowViews:
    """Rows built anywhere (not only read by ``Split.views``, which checks them), checked the same way:
    each row's cu_seqlens runs from 0 to its length."""
    if not rows:
        raise ValueError("a micro-batch needs at least one row")
    for i, row in enumerate(rows):
        cu, n = row.cu_seqlens, len(row.input_ids)
        if n < 1 or len(cu) < 2 or cu[0] != 0 or cu[-1] != n:
            raise InvariantError(
                f"row {i} of the micro-batch has cu_seqlens {cu[:4].tolist()}...{cu[-1:].tolist()} for"
                f" {n} tokens; run `prep verify` on the dataset."
            )
    return RowViews(
        input_ids=[r.input_ids for r in rows],
        labels=[r.labels for r in rows],
        position_ids=[r.position_ids for r in rows],
        cu_seqlens=[r.cu_seqlens for r in rows],
        num_tokens=[len(r.input_ids) for r in rows],
        num_segments=[len(r.cu_seqlens) - 1 for r in rows],
    )


def batch_from_rows(rows: Sequence[PackedRow]) -> VarlenBatch:
    """Concatenate packed rows into one varlen micro-batch (on the CPU, in fresh tensors)."""
    return cpu_batches(checked_views(rows), len(rows))[0]
