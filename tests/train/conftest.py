"""Packed datasets for the trainer's tests, made from the bundled sample with `prep pack`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prep.pipeline import PackConfig, pack


@pytest.fixture(scope="session")
def packed_sample(sample, tmp_path_factory) -> Path:
    """The sample corpus packed at seq_len 128 with a `val` split (about 600 train rows)."""
    corpus, tokenizer = sample
    out = tmp_path_factory.mktemp("packed") / "sample-128"
    pack(
        PackConfig(
            inputs=(str(corpus),),
            tokenizer=str(tokenizer),
            out=out,
            seq_len=128,
            val_fraction=0.1,
            rows_per_shard=100,
        )
    )
    return out


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """One intra-op thread for these tiny models: on a shared 2-core machine, two spinning OpenMP
    threads per process made each step ~30x slower (measured: 4 s vs 0.12 s per micro-batch)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
