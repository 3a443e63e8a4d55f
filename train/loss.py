"""Summed next-token cross-entropy over a micro-batch, computed in chunks so full logits never exist.

With a 151,936-token vocabulary, the logits of an 8k-token micro-batch are 8192 x 151936 fp32 values
(5 GB) before their gradient doubles it. Here the output head and the cross-entropy run on
``chunk_tokens`` positions at a time inside ``torch.utils.checkpoint``: the forward keeps only each
chunk's scalar loss, and the backward recomputes one chunk's logits at a time. Peak extra memory is
about ``chunk_tokens * V`` floats, whatever T is.

Labels follow the Hugging Face convention (unshifted): hidden state t predicts ``labels[t + 1]``. A
segment's first label is -100, so shifting never asks a token to predict the next document.

The loss is a SUM, returned with the number of targets. The training loop divides by the target tokens
of the whole optimizer step (all micro-batches, all ranks), so that every target token weighs the same
however the step is split; averaging per micro-batch would not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared.contract import IGNORE_INDEX
from train.batch import VarlenBatch
from train.model import autocast_of, forward_hidden, output_head

DEFAULT_CHUNK_TOKENS = 1024
"""Positions per chunk: 1024 x 151,936 fp32 logits are 0.6 GB, a fair price on a GPU."""


def _chunk_loss_sum(head: nn.Module, hidden_ND: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    # Upcast before the softmax: bf16 logits lose the small probabilities the loss depends on
    # (float64 stays float64, so that tests can compare against an exact reference).
    logits_NV = head(hidden_ND)
    logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
    return F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(
    hidden_TD: torch.Tensor,
    head: nn.Module,
    labels_T: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_targets)`` of next-token prediction over one flat stream.

    ``hidden_TD`` are final hidden states ``[T, D]`` (or ``[1, T, D]``), ``labels_T`` the unshifted
    labels ``[T]`` (or ``[1, T]``). ``num_targets`` is a 0-d tensor (no device sync).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens}")
    hidden_TD = hidden_TD.reshape(-1, hidden_TD.shape[-1])
    labels_T = labels_T.reshape(-1)
    assert hidden_TD.shape[0] == labels_T.shape[0], (hidden_TD.shape, labels_T.shape)
    # Position t predicts labels[t + 1]; the last position predicts nothing.
    hidden_ND = hidden_TD[:-1]
    targets_N = labels_T[1:]
    # Zero that is still connected to the graph, so that backward() works even with no chunk at all.
    total = hidden_ND[:0].sum(dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (
        hidden_ND.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    for start in range(0, hidden_ND.shape[0], chunk_tokens):
        h = hidden_ND[start : start + chunk_tokens]
        t = targets_N[start : start + chunk_tokens]
        if needs_grad:
            total = total + checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, h, t)
    num_targets = (targets_N != IGNORE_INDEX).sum()
    return total, num_targets


def micro_batch_loss_sum(
    model: nn.Module, batch: VarlenBatch, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Summed cross-entropy over ``batch``'s ``num_target_tokens`` targets (fp32 0-d tensor).

    Divide by the target tokens of the whole optimizer step before ``backward()``.
    """
    hidden = forward_hidden(model, batch)
    with autocast_of(model, hidden.device):
        loss_sum, _ = chunked_cross_entropy_sum(
            hidden, output_head(model), batch.labels, chunk_tokens=chunk_tokens
        )
    return loss_sum
