"""The grouped, vectorised assembly gives exactly the batches a straightforward per-row reference gives,
and its buffer pool never overwrites a batch the caller still holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.contract import IGNORE_INDEX
from shared.reader import PackedDataset
from train import gather
from train.gather import TokenPool, batch_from_rows, cpu_batches
from train.loader import Loader, _stage, _unstage


@pytest.fixture(scope="module")
def split(packed_sample):
    return PackedDataset(packed_sample).split("train")


def reference(split, indices) -> dict:
    """One micro-batch of ``indices``, built row by row with plain torch and Python: the oracle."""
    rows = [split.row(int(i)) for i in indices]
    cu = [0]
    for row in rows:
        cu += [cu[-1] + int(x) for x in row.cu_seqlens[1:]]
    labels = torch.cat([torch.tensor(r.labels.tolist(), dtype=torch.int64) for r in rows])
    return {
        "input_ids": torch.cat([torch.tensor(r.input_ids.tolist(), dtype=torch.int64) for r in rows])[None],
        "labels": labels[None],
        "position_ids": torch.cat([torch.tensor(r.position_ids.tolist(), dtype=torch.int64) for r in rows])[
            None
        ],
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        "num_target_tokens": int((labels != IGNORE_INDEX).sum()),
    }


def differences(batch, expected: dict) -> list[str]:
    """Fields of ``batch`` that differ from ``expected`` in value, dtype or shape."""
    out = []
    for name, want in expected.items():
        got = getattr(batch, name)
        if isinstance(want, torch.Tensor):
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                out.append(name)
        elif got != want:
            out.append(name)
    return out


def test_comparison_catches_a_changed_batch(split):
    """Negative control for the comparison every test below relies on."""
    batch = batch_from_rows([split.row(i) for i in (3, 1)])
    expected = reference(split, [3, 1])
    assert differences(batch, expected) == []
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
        broken = dict(expected, **{name: expected[name].clone()})
        broken[name].view(-1)[-1] += 1
        assert differences(batch, broken) == [name]
    assert differences(batch, dict(expected, max_seqlen=expected["max_seqlen"] + 1)) == ["max_seqlen"]
    assert differences(batch, dict(expected, input_ids=expected["input_ids"].int())) == ["input_ids"]
    # rows in another order are another batch
    assert differences(batch, reference(split, [1, 3]))


@pytest.mark.parametrize(("batch_size", "rank", "world_size"), [(1, 0, 1), (3, 0, 1), (4, 1, 2), (7, 2, 3)])
def test_loader_stream_equals_the_per_row_reference(split, batch_size, rank, world_size):
    """Into the second epoch, across group boundaries, on every rank layout: batch for batch."""
    with Loader(split, batch_size=batch_size, seed=11, rank=rank, world_size=world_size) as loader:
        assert loader.group_size > 1  # the grouped path is the one under test
        num = loader.batches_per_epoch + 2 * loader.group_size + 1
        for k in range(num):
            epoch, index = divmod(k, loader.batches_per_epoch)
            expected = reference(split, loader.batch_rows(epoch, index))
            assert differences(next(loader), expected) == [], (epoch, index)


def test_staged_groups_equal_the_reference(split, monkeypatch):
    """The CUDA path's host half and its device half, run on CPU (the copy is to the CPU itself)."""

    class FakeEvent:
        def record(self):
            pass

    from train import loader as loader_module

    monkeypatch.setattr(loader_module.torch.cuda, "Event", FakeEvent)
    buffers = loader_module._HostBuffers.allocate(5 * 3 * 128, 5, pin=False)
    order = np.random.default_rng(0).permutation(split.num_rows)
    for group in (1, 2, 5):
        indices = order[: group * 3].tolist()
        batches = _unstage(_stage(split.views(indices), 3, buffers), torch.device("cpu"))
        assert len(batches) == group
        for g, batch in enumerate(batches):
            assert differences(batch, reference(split, indices[3 * g : 3 * g + 3])) == []


def test_pool_never_overwrites_a_batch_that_is_still_held(split, monkeypatch):
    order = np.random.default_rng(1).permutation(split.num_rows).tolist()
    groups = [order[k : k + 8] for k in range(0, 8 * 20, 8)]  # 20 groups of 4 batches of 2 rows
    pool = TokenPool(3)

    def run() -> list[list[str]]:
        kept = [(indices, cpu_batches(split.views(indices), 2, pool)) for indices in groups]
        return [
            differences(batch, reference(split, indices[2 * g : 2 * g + 2]))
            for indices, batches in kept
            for g, batch in enumerate(batches)
        ]

    assert all(d == [] for d in run())
    # dropped batches free their buffer: the pool hands the same memory out again
    first = cpu_batches(split.views(groups[0]), 2, pool)[0].input_ids.data_ptr()
    assert cpu_batches(split.views(groups[1]), 2, pool)[0].input_ids.data_ptr() == first
    # negative control: a pool that believed every buffer free would overwrite the kept batches
    monkeypatch.setattr(gather.sys, "getrefcount", lambda obj: 2)
    assert any(d != [] for d in run())


def test_sequential_and_single_row_batches_equal_the_reference(split):
    for indices in ([0], [5, 0, 17], list(range(split.num_rows - 9, split.num_rows))):
        batch = batch_from_rows([split.row(i) for i in indices])
        assert differences(batch, reference(split, indices)) == []
