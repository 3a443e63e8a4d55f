"""The loader: deterministic per-epoch shuffle, disjoint rank shares, exact batches, no copy of the data."""

from __future__ import annotations

import numpy as np
import psutil
import pyarrow as pa
import pytest
import torch

from shared.contract import IGNORE_INDEX
from shared.errors import InvariantError, UserError
from shared.reader import PackedDataset, PackedRow
from train.loader import Loader, _HostBuffers, _stage, _unstage, batch_from_rows, sequential_batches


@pytest.fixture(scope="module")
def split(packed_sample):
    return PackedDataset(packed_sample, verify="checksum").split("train")


def test_shuffle_is_a_function_of_seed_and_epoch(split):
    a = Loader(split, batch_size=4, seed=3)
    b = Loader(split, batch_size=4, seed=3)
    c = Loader(split, batch_size=4, seed=4)
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert np.array_equal(np.sort(a.epoch_order(0)), np.arange(split.num_rows))
    # negative controls: another epoch or another seed gives another order
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))


def test_rank_shares_are_disjoint_and_cover_every_row(split):
    world = 3
    shares = [
        Loader(split, batch_size=2, seed=0, rank=r, world_size=world).rank_rows(5) for r in range(world)
    ]
    together = np.concatenate(shares)
    assert len(together) == split.num_rows
    assert len(np.unique(together)) == split.num_rows
    assert all(abs(len(s) - split.num_rows / world) < 1 for s in shares)


def test_batch_matches_its_rows_exactly(split):
    rows = [split.row(i) for i in (5, 0, 17)]
    batch = batch_from_rows(rows)
    offsets = np.cumsum([0] + [r.num_tokens for r in rows])
    assert batch.input_ids.shape == (1, offsets[-1])
    assert batch.input_ids.dtype == torch.int64 and batch.cu_seqlens.dtype == torch.int32
    for row, lo, hi in zip(rows, offsets[:-1], offsets[1:], strict=True):
        assert np.array_equal(batch.input_ids[0, lo:hi].numpy(), row.input_ids)
        assert np.array_equal(batch.labels[0, lo:hi].numpy(), row.labels)
        assert np.array_equal(batch.position_ids[0, lo:hi].numpy(), row.position_ids)
    expected_cu = np.concatenate(
        [r.cu_seqlens[:-1] + lo for r, lo in zip(rows, offsets[:-1], strict=True)] + [[offsets[-1]]]
    )
    assert batch.cu_seqlens.tolist() == expected_cu.tolist()
    assert batch.num_segments == sum(r.num_segments for r in rows)
    assert batch.max_seqlen == int(np.diff(expected_cu).max())
    assert batch.num_target_tokens == sum(int((r.labels != IGNORE_INDEX).sum()) for r in rows)
    # every segment starts at position 0 and its first token is never a target
    starts = batch.cu_seqlens[:-1].long()
    assert (batch.position_ids[0, starts] == 0).all()
    assert (batch.labels[0, starts] == IGNORE_INDEX).all()


def test_batch_into_reused_buffers_equals_fresh(split, monkeypatch):
    """The CUDA path's staging, run on CPU: groups staged int32 into one reused buffer set, then
    'copied' (to the CPU) and cast, equal fresh batches of the same rows."""
    from train import loader as loader_module

    monkeypatch.setattr(loader_module.torch.cuda, "Event", FakeEvent)
    buffers = _HostBuffers.allocate(4 * 128, 2, pin=False)
    for idx, batch_size in (([0, 1, 2, 3], 2), ([9], 1), ([4, 8], 1)):
        staged = _stage(split.views(idx), batch_size, buffers)
        for k, got in enumerate(_unstage(staged, torch.device("cpu"))):
            fresh = batch_from_rows([split.row(i) for i in idx[k * batch_size : (k + 1) * batch_size]])
            for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(getattr(fresh, name), getattr(got, name)), name
            assert (fresh.max_seqlen, fresh.num_target_tokens) == (got.max_seqlen, got.num_target_tokens)


class FakeEvent:
    """Stands in for ``torch.cuda.Event`` on a machine without CUDA."""

    def record(self):
        pass

    def synchronize(self):
        pass


def test_broken_row_boundaries_are_refused(split):
    row = split.row(0)
    broken = PackedRow(
        input_ids=row.input_ids,
        labels=row.labels,
        position_ids=row.position_ids,
        cu_seqlens=np.concatenate([row.cu_seqlens[:-1], [row.num_tokens - 1]]).astype(np.int32),
        doc_ids=row.doc_ids,
    )
    with pytest.raises(InvariantError, match="cu_seqlens"):
        batch_from_rows([broken])


def test_stream_follows_the_order_and_crosses_epochs(split):
    with Loader(split, batch_size=8, grad_accum=2, seed=1, rank=1, world_size=2) as loader:
        per_epoch = loader.batches_per_epoch
        assert per_epoch == (split.num_rows // 2) // 16 * 2
        for step in range(per_epoch + 3):
            epoch, index = divmod(step, per_epoch)
            assert loader.state_dict()["epoch"] == epoch
            assert loader.state_dict()["batch_in_epoch"] == index
            expected = batch_from_rows([split.row(int(i)) for i in loader.batch_rows(epoch, index)])
            got = next(loader)
            assert torch.equal(got.input_ids, expected.input_ids)
            assert torch.equal(got.cu_seqlens, expected.cu_seqlens)


def test_state_dict_resumes_the_same_stream(split):
    with Loader(split, batch_size=4, seed=7) as full:
        stream = [next(full).input_ids for _ in range(12)]
    with Loader(split, batch_size=4, seed=7) as first:
        for _ in range(5):
            next(first)
        state = first.state_dict()
    with Loader(split, batch_size=4, seed=7) as resumed:
        resumed.load_state_dict(state)
        rest = [next(resumed).input_ids for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(stream[5:], rest, strict=True))
    with Loader(split, batch_size=8, seed=7) as other, pytest.raises(UserError, match="batch_size"):
        other.load_state_dict(state)


def step_rows(loader: Loader, epoch: int, step: int) -> set[int]:
    first = step * loader.grad_accum
    return {int(i) for k in range(first, first + loader.grad_accum) for i in loader.batch_rows(epoch, k)}


def test_position_is_world_size_free_at_equal_rows_per_step(split):
    """2 ranks x grad_accum 1 and 1 rank x grad_accum 2 train every step on the same rows, and a
    position saved by the first resumes the second at the same step (also across an epoch)."""
    ranks = [Loader(split, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    single = Loader(split, batch_size=2, grad_accum=2, seed=5)
    steps_per_epoch = single.batches_per_epoch // 2
    assert ranks[0].batches_per_epoch == steps_per_epoch
    for epoch, step in ((0, 0), (0, 7), (1, steps_per_epoch - 1)):
        assert step_rows(single, epoch, step) == step_rows(ranks[0], epoch, step) | step_rows(
            ranks[1], epoch, step
        )
    for _ in range(steps_per_epoch + 3):  # into the second epoch
        next(ranks[1])
    state = ranks[1].state_dict()
    ranks[1].close()
    assert (state["epoch"], state["rows_in_epoch"]) == (1, 3 * 4)
    with Loader(split, batch_size=2, grad_accum=2, seed=5) as resumed:
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.batch_in_epoch) == (1, 6)
        # a position written before rows_in_epoch existed is read the same way
        legacy = {k: v for k, v in state.items() if k not in ("rows_in_epoch", "rows_per_step")}
        resumed.load_state_dict(legacy)
        assert (resumed.epoch, resumed.batch_in_epoch) == (1, 6)
    # negative control: another number of rows per step is refused with the flags to change
    with Loader(split, batch_size=2, seed=5) as other, pytest.raises(UserError, match="--grad-accum"):
        other.load_state_dict(state)


def test_too_few_rows_for_a_step_is_a_clear_error(split):
    with pytest.raises(UserError, match="too few for one step"):
        Loader(split, batch_size=split.num_rows, grad_accum=2, seed=0)


def test_sequential_batches_cover_every_row_once(split):
    seen = sum(
        b.num_tokens for r in range(2) for b in sequential_batches(split, batch_size=7, rank=r, world_size=2)
    )
    assert seen == int(split.row_lengths().sum())


def test_rows_are_views_of_the_memory_map(split):
    before = pa.total_allocated_bytes()
    shard = split.shards[0]
    mapped = shard.batches()[0].column("input_ids").values
    view = np.frombuffer(mapped.buffers()[1], dtype=np.int32)
    row = split.row(0)
    assert np.shares_memory(row.input_ids, view)
    assert not row.input_ids.flags.writeable  # a view of a read-only mapping, not a private copy
    assert pa.total_allocated_bytes() == before


def test_resident_memory_does_not_grow_with_the_data(split):
    """Anonymous memory (RSS minus file-backed pages) stays flat over a dozen epochs of micro-batches:
    the loader keeps nothing per row or per batch (the data itself is never copied, see above)."""
    proc = psutil.Process()

    def anonymous() -> int:
        info = proc.memory_info()
        return info.rss - info.shared

    with Loader(split, batch_size=8, seed=0) as loader:
        for _ in range(loader.batches_per_epoch):  # warm up allocator caches
            next(loader)
        start = anonymous()
        total = 0
        for _ in range(12 * loader.batches_per_epoch):
            total += next(loader).num_tokens * 8 * 3
    grown = anonymous() - start
    assert total > 20 << 20  # the loop handed out > 20 MB of int64 tensors ...
    assert grown < 4 << 20  # ... without holding on to them


def test_pinned_ring_path_waits_for_each_copy_before_refilling(split, monkeypatch):
    """The CUDA staging logic, run on CPU: buffers rotate through a ring, and a buffer is refilled only
    after the event recorded after its copy has been waited on. (No GPU here: the event is a fake and
    the 'copy' to the CPU device is the buffer itself, so the test clones each batch at once.)"""
    from train import loader as loader_module

    log: list[tuple[str, int]] = []

    class FakeEvent:
        def __init__(self):
            self.id = len(log)

        def record(self):
            log.append(("record", self.id))

        def synchronize(self):
            log.append(("wait", self.id))

    monkeypatch.setattr(loader_module.torch.cuda, "Event", FakeEvent)
    with Loader(split, batch_size=3, seed=2) as loader:
        ring_size, group = loader_module.PREFETCH + 2, loader.group_size
        ring = [_HostBuffers.allocate(group * 3 * 128, group, pin=False) for _ in range(ring_size)]
        loader._assembly = loader_module._PinnedAssembly(torch.device("cpu"), ring)
        num = 3 * ring_size  # groups
        start = 0
        for k in range(num * group):
            got = next(loader)
            expected = batch_from_rows([split.row(int(i)) for i in loader.batch_rows(0, k)])
            # the batch crossed over in its group's buffer: its input_ids (int32) follow the group's earlier ones
            staged = ring[(k // group) % ring_size].array
            start = 0 if k % group == 0 else start
            assert np.array_equal(staged[start : start + got.num_tokens], expected.input_ids[0].numpy())
            start += got.num_tokens
            assert torch.equal(got.input_ids.clone(), expected.input_ids)
            assert torch.equal(got.cu_seqlens.clone(), expected.cu_seqlens)
    records = [i for kind, i in log if kind == "record"]
    waits = [i for kind, i in log if kind == "wait"]
    assert len(records) == num
    # every refill of a buffer waited on that buffer's latest copy event, in order
    assert waits[: num - ring_size] == records[: num - ring_size]
    for i in waits:
        assert log.index(("record", i)) < log.index(("wait", i))
