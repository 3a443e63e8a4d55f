"""A small packed dataset the reader tests share (each test that damages it works on a copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prep.pipeline import PackConfig, pack


@pytest.fixture(scope="session")
def packed(sample, tmp_path_factory) -> Path:
    """The bundled sample at seq_len 128 in shards of 150 rows: several shards, rows across record batches."""
    corpus, tok = sample
    out = tmp_path_factory.mktemp("reader") / "packed"
    pack(PackConfig(inputs=(str(corpus),), tokenizer=str(tok), out=out, seq_len=128, rows_per_shard=150))
    return out
