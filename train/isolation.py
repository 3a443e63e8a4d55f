"""The numerical core of `train check`: a packed row's logits against each of its segments run alone."""

from __future__ import annotations

import torch

from train.batch import VarlenBatch
from train.model import autocast_for, forward_hidden, forward_hidden_naive, output_head

LOGIT_CHUNK = 256
"""Positions whose logits are compared at once, so a 151k vocabulary never needs [T, V] logits."""


def segment_batch(batch: VarlenBatch, start: int, end: int) -> VarlenBatch:
    return VarlenBatch(
        input_ids=batch.input_ids[:, start:end],
        labels=batch.labels[:, start:end],
        position_ids=batch.position_ids[:, start:end],
        cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32, device=batch.cu_seqlens.device),
        max_seqlen=end - start,
        num_target_tokens=-1,  # not used by a forward pass
    )


@torch.no_grad()
def compare_row(model: torch.nn.Module, batch: VarlenBatch, *, naive: bool = False) -> tuple[float, float]:
    """``(max |logit difference|, max |logit|)`` between the packed row and its segments run alone.

    Logits are computed only for tokens whose final hidden states differ at all: identical hidden
    states give identical logits through the same head, so skipping them changes nothing but the cost
    (on CPU, a correct setup gives bitwise identical states and the check costs two forwards). The
    scale is the largest |logit| among the tokens compared.
    """
    head = output_head(model)
    forward = forward_hidden_naive if naive else forward_hidden
    packed_TD = forward(model, batch)[0]
    max_diff, scale = 0.0, 0.0
    bounds = batch.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        alone_ND = forward_hidden(model, segment_batch(batch, start, end))[0]
        packed_ND = packed_TD[start:end]
        differs = (alone_ND != packed_ND).any(dim=-1).nonzero().squeeze(1)
        for lo in range(0, differs.numel(), LOGIT_CHUNK):
            rows = differs[lo : lo + LOGIT_CHUNK]
            with autocast_for(packed_TD.device):
                alone = head(alone_ND[rows]).float()
                packed = head(packed_ND[rows]).float()
            max_diff = max(max_diff, (packed - alone).abs().max().item())
            scale = max(scale, alone.abs().max().item())
    return max_diff, scale
