"""Small things the trainer tests share: the tiny LoRA model with every adapter weight live, a working folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from train.model import LoraSettings, load_model


def tiny_lora(vocab_size: int, **kw) -> torch.nn.Module:
    """`tiny-qwen2` with an r=4 LoRA adapter (seed 1, `sdpa`), ``kw`` passed to `load_model`.

    A LoRA B is zero at init, so its A would get no gradient: B gets values here, so that a test of
    gradients compares every adapter weight.
    """
    model = load_model(
        "tiny-qwen2", vocab_size=vocab_size, attn="sdpa", lora=LoraSettings(r=4, alpha=8), seed=1, **kw
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block from ``path``, as a user who started there (`contextlib.chdir` needs Python 3.11)."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
