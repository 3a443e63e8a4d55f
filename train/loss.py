"""Summed next-token cross-entropy over a micro-batch, computed in chunks so full logits never exist.

With a 151,936-token vocabulary, the logits of an 8k-token micro-batch are 8192 x 151936 fp32 values
(5 GB) before their gradient doubles it. Here the output head and the cross-entropy run on
``chunk_tokens`` positions at a time, so peak extra memory is about ``chunk_tokens * V`` floats,
whatever T is. Two ways, the same numbers:

- fused (:func:`fused_cross_entropy_sum`, what training uses when the head is a plain ``nn.Linear``):
  the forward computes each chunk's logits, their fp32 log-sum-exp and loss, and at once the
  gradients, ``(softmax - onehot) @ W`` for the hidden states (and ``(softmax - onehot)^T @ h`` for
  the head's weight, its bias, only when they train), into buffers of the hidden states' (the head's)
  size. The backward only scales those by the incoming gradient. With a frozen head (LoRA) that is two
  [chunk, D] x [D, V] matmuls per chunk where the reference runs three, and no logits are kept.
- checkpointed (:func:`checkpointed_cross_entropy_sum`, the reference, and the path for any other
  head: a LoRA-wrapped one, a custom module, a weight sharded as a DTensor): each chunk's loss inside
  ``torch.utils.checkpoint``; the backward recomputes the chunk's logits before its matmuls.

Both run the head's matmuls in the caller's autocast dtype (bf16 on a GPU) and the softmax in fp32;
float64 stays float64, so that tests compare them with a plain full-logits ``F.cross_entropy``. Under
FSDP2 (`train.parallel`) the loss runs inside the root's forward, where the head's weight is the
gathered, plain tensor: the fused path runs there too, and its weight gradient reaches FSDP's
reduce-scatter through autograd like any other. A tied head's weight gradient adds to the embedding's.

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
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from shared.contract import IGNORE_INDEX
from train.batch import VarlenBatch
from train.model import autocast_of, forward_hidden, output_head

DEFAULT_CHUNK_TOKENS = 1024
"""Positions per chunk: 1024 x 151,936 fp32 logits are 0.6 GB, a fair price on a GPU."""


def chunked_cross_entropy_sum(
    hidden_TD: torch.Tensor,
    head: nn.Module,
    labels_T: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_targets)`` of next-token prediction over one flat stream.

    ``hidden_TD`` are final hidden states ``[T, D]`` (or ``[1, T, D]``), ``labels_T`` the unshifted
    labels ``[T]`` (or ``[1, T]``). ``num_targets`` is a 0-d tensor (no device sync). Fused where
    :func:`can_fuse` proves it equal to the checkpointed reference, checkpointed otherwise.
    """
    if can_fuse(hidden_TD, head):
        return fused_cross_entropy_sum(hidden_TD, head, labels_T, chunk_tokens=chunk_tokens)
    return checkpointed_cross_entropy_sum(hidden_TD, head, labels_T, chunk_tokens=chunk_tokens)


def _shifted(
    hidden_TD: torch.Tensor, labels_T: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_ND, targets_N)``: position t paired with ``labels[t + 1]``; the last predicts nothing."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens}")
    hidden_TD = hidden_TD.reshape(-1, hidden_TD.shape[-1])
    labels_T = labels_T.reshape(-1)
    assert hidden_TD.shape[0] == labels_T.shape[0], (hidden_TD.shape, labels_T.shape)
    return hidden_TD[:-1], labels_T[1:]


# -- the checkpointed reference -------------------------------------------------------------------------


def _chunk_loss_sum(head: nn.Module, hidden_ND: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    # Upcast before the softmax: bf16 logits lose the small probabilities the loss depends on
    # (float64 stays float64, so that tests can compare against an exact reference).
    logits_NV = head(hidden_ND)
    logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
    return F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE_INDEX, reduction="sum")


def checkpointed_cross_entropy_sum(
    hidden_TD: torch.Tensor,
    head: nn.Module,
    labels_T: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunked_cross_entropy_sum` for any ``head`` module: each chunk checkpointed (the reference)."""
    hidden_ND, targets_N = _shifted(hidden_TD, labels_T, chunk_tokens)
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


# -- the fused path -----------------------------------------------------------------------------------------


def _matmul_dtype(hidden: torch.Tensor, params: list[torch.Tensor | None]) -> torch.dtype | None:
    """The dtype ``F.linear(hidden, *params)`` multiplies in (autocast's rule for ``linear``), or None
    where that call is not a matmul in one dtype (mixed dtypes without autocast: the reference raises)."""
    dtypes = {p.dtype for p in params if p is not None} | {hidden.dtype}
    if not all(d.is_floating_point for d in dtypes):
        return None
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in dtypes:
        return torch.get_autocast_dtype(device_type)
    return dtypes.pop() if len(dtypes) == 1 else None


def can_fuse(hidden_TD: torch.Tensor, head: nn.Module) -> bool:
    """Whether :func:`fused_cross_entropy_sum` computes what ``head`` would: a plain ``nn.Linear`` (not a
    subclass, no hooks) whose parameters are ordinary tensors on the hidden states' device (not
    DTensors), of one dtype or under autocast. Anything else goes to the checkpointed reference."""
    if type(head) is not nn.Linear or any(
        (head._forward_hooks, head._forward_pre_hooks, head._backward_hooks, head._backward_pre_hooks)
    ):
        return False
    params = [head.weight] if head.bias is None else [head.weight, head.bias]
    if any(type(p) not in (torch.Tensor, nn.Parameter) or p.device != hidden_TD.device for p in params):
        return False
    return _matmul_dtype(hidden_TD, params) is not None


def _softmax_minus_onehot(logits_nV: torch.Tensor, targets_n: torch.Tensor) -> torch.Tensor:
    """The chunk's summed loss; ``logits_nV`` (fp32 or fp64, owned) becomes its gradient in place:
    ``softmax - onehot``, rows of ignored targets zero. In place, so that one [n, V] buffer is all."""
    valid_n = targets_n != IGNORE_INDEX
    safe_n1 = torch.where(valid_n, targets_n, 0).unsqueeze(1)  # ignored rows gather column 0, unused
    target_logit_n = logits_nV.gather(1, safe_n1).squeeze(1)
    max_n = logits_nV.amax(dim=1)
    probs_nV = logits_nV.sub_(max_n.unsqueeze(1)).exp_()
    sum_n = probs_nV.sum(dim=1)
    loss = torch.where(valid_n, max_n + sum_n.log() - target_logit_n, 0).sum()
    probs_nV.div_(sum_n.unsqueeze(1))
    valid_n1 = valid_n.to(probs_nV.dtype).unsqueeze(1)
    probs_nV.scatter_add_(1, safe_n1, -valid_n1).mul_(valid_n1)
    return loss


def _fused_chunk(h_nD, t_n, w_VD, b_V, grad_hidden_nD, grad_weight_VD, grad_bias_V) -> torch.Tensor:
    """One chunk: its summed loss; adds its gradients into the buffers given (None: not wanted). A
    function of its own so that the chunk's [n, V] buffers are freed before the next chunk's exist."""
    logits_nV = F.linear(h_nD, w_VD, b_V)
    logits_nV = logits_nV.to(torch.promote_types(logits_nV.dtype, torch.float32))
    loss = _softmax_minus_onehot(logits_nV, t_n)
    if grad_hidden_nD is None and grad_weight_VD is None and grad_bias_V is None:
        return loss
    grad_nV = logits_nV.to(w_VD.dtype)  # the matmul dtype, as autocast's backward would
    del logits_nV
    if grad_hidden_nD is not None:
        grad_hidden_nD.copy_(grad_nV @ w_VD)
    if grad_weight_VD is not None:
        grad_weight_VD += grad_nV.t() @ h_nD
    if grad_bias_V is not None:
        grad_bias_V += grad_nV.sum(dim=0)
    return loss


def _fused_forward(hidden_ND, weight_VD, bias_V, targets_N, chunk_tokens, needs):
    """Loss sum and, for the inputs ``needs`` flags, their gradients: one pass over the chunks."""
    mm_dtype = _matmul_dtype(hidden_ND, [weight_VD, bias_V])
    assert mm_dtype is not None, "can_fuse() must hold"
    need_hidden, need_weight, need_bias = needs
    w_VD = weight_VD.to(mm_dtype)  # cast once (autocast would cast it for every matmul)
    b_V = None if bias_V is None else bias_V.to(mm_dtype)
    acc_dtype = torch.promote_types(weight_VD.dtype, torch.float32)
    grad_hidden = torch.empty_like(hidden_ND) if need_hidden else None
    grad_weight = torch.zeros_like(weight_VD, dtype=acc_dtype) if need_weight else None
    grad_bias = torch.zeros_like(bias_V, dtype=acc_dtype) if need_bias else None
    loss = hidden_ND.new_zeros((), dtype=torch.promote_types(mm_dtype, torch.float32))
    with torch.autocast(hidden_ND.device.type, enabled=False):
        for start in range(0, hidden_ND.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            grad_hidden_nD = None if grad_hidden is None else grad_hidden[rows]
            h_nD = hidden_ND[rows].to(mm_dtype)
            loss = loss + _fused_chunk(
                h_nD, targets_N[rows], w_VD, b_V, grad_hidden_nD, grad_weight, grad_bias
            )
    grad_weight = None if grad_weight is None else grad_weight.to(weight_VD.dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(bias_V.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ W^T + b, targets))`` with its gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, targets_N, chunk_tokens):
        loss, *grads = _fused_forward(
            hidden_ND, weight_VD, bias_V, targets_N, chunk_tokens, ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # d(loss)/d(input) was computed in the forward; the chain rule only scales it (no host sync:
        # grad_loss stays a device tensor)
        scaled = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        return *scaled, None, None


def fused_cross_entropy_sum(
    hidden_TD: torch.Tensor,
    head: nn.Linear,
    labels_T: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunked_cross_entropy_sum` with the head fused into the loss (``can_fuse(hidden_TD, head)``
    must hold). Without gradients (``torch.no_grad()``, or nothing requires grad) it computes the loss
    alone: one matmul per chunk."""
    assert can_fuse(hidden_TD, head), "fused_cross_entropy_sum needs a plain nn.Linear head"
    hidden_ND, targets_N = _shifted(hidden_TD, labels_T, chunk_tokens)
    if torch.is_grad_enabled():
        loss = _FusedLinearCrossEntropy.apply(hidden_ND, head.weight, head.bias, targets_N, chunk_tokens)
    else:  # eval: the loss alone (a Function's needs_input_grad ignores no_grad)
        no_grads = (False, False, False)
        loss = _fused_forward(hidden_ND, head.weight, head.bias, targets_N, chunk_tokens, no_grads)[0]
    return loss, (targets_N != IGNORE_INDEX).sum()


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
