"""Packed datasets for the trainer's tests, made from the bundled sample with `prep pack`."""

from __future__ import annotations

from pathlib import Path

import pytest

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
