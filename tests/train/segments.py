"""Synthetic varlen batches for the attention, loss and check tests: random tokens in given segment lengths."""

from __future__ import annotations

import torch

from shared.contract import IGNORE_INDEX
from train.batch import VarlenBatch


def make_batch(lengths: list[int], vocab_size: int, seed: int = 0) -> VarlenBatch:
    """One flat stream of segments with the shard contract's labels (first label of each segment -100)."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    input_ids = torch.randint(0, vocab_size, (1, num_tokens), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels = input_ids.clone()
    labels[0, cu_seqlens[:-1].long()] = IGNORE_INDEX
    return VarlenBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        num_target_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def segment(batch: VarlenBatch, index: int) -> VarlenBatch:
    """Segment ``index`` of ``batch`` as a batch of its own."""
    start, end = batch.cu_seqlens[index].item(), batch.cu_seqlens[index + 1].item()
    labels = batch.labels[:, start:end]
    return VarlenBatch(
        input_ids=batch.input_ids[:, start:end],
        labels=labels,
        position_ids=batch.position_ids[:, start:end],
        cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32),
        max_seqlen=end - start,
        num_target_tokens=int((labels != IGNORE_INDEX).sum()),
    )
