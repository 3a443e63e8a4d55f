"""Data parallelism for `train run` under ``torchrun``: the process group, gradient sums, and FSDP2.

Two schemes, both with each rank reading its own rows (`train.loader`) and the loss divided by the
target count of the whole step on all ranks (`train.loop`):

- replicated (LoRA, or small models): every rank holds the whole model. Our forward calls the decoder
  and the chunked output head directly (`train.model.forward_hidden`), never a wrapper's ``forward``,
  so DDP's hooks would not fire; instead :func:`all_reduce_grads` sums the trainable gradients once per
  step, after the last micro-batch, in a few large flat buckets (one collective per bucket).
- sharded (``--fsdp``, full fine-tuning): FSDP2 ``fully_shard`` on every decoder layer and on a root
  :class:`VarlenLoss` module that owns the embeddings, final norm and output head (tied weights stay in
  one group). The loss runs through ``VarlenLoss.forward`` so that FSDP's hooks gather and free each
  group's parameters; gradients are reduce-scattered by FSDP itself, once per step
  (``set_requires_gradient_sync`` is off for the earlier micro-batches).

Checkpoints of a sharded model are gathered into full, unsharded state dicts on rank 0 (keyed by
parameter name, as the single-process trainer writes them), so a run can resume on any number of ranks,
with or without FSDP.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from shared.errors import UserError
from train.batch import VarlenBatch
from train.loss import micro_batch_loss_sum
from train.model import causal_lm

BUCKET_ELEMENTS = 1 << 25
"""Gradient elements per all-reduce (128 MiB of fp32): large enough for few collectives, small enough
that the flat copy does not double a big model's gradient memory."""


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(device: str = "auto") -> bool:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR);
    do nothing for a single process. NCCL with one GPU per rank (LOCAL_RANK) when the run's ``device``
    is CUDA (``auto`` with a GPU), else gloo: NCCL cannot reduce the CPU tensors of a ``--device cpu`` run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.startswith("cuda:"):
        raise UserError(
            f"--device {device} under torchrun would put every rank on one GPU; pass `--device cuda` (or"
            " `auto`): each rank then uses the GPU of its LOCAL_RANK."
        )
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_grads(params: list[nn.Parameter], bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Sum the gradients of ``params`` over ranks, in flat buckets of one dtype each.

    A parameter without a gradient gets zeros first: every rank must send buffers of the same layout,
    or the collectives would pair up different tensors.
    """
    if dist_info()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [p.grad for p in params]:
        if bucket and (size + g.numel() > bucket_elements or g.dtype != bucket[0].dtype):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class VarlenLoss(nn.Module):
    """``forward(batch)`` = the micro-batch's summed cross-entropy (`train.loss.micro_batch_loss_sum`).

    The FSDP root: calling the loss through a module's ``forward`` is what lets FSDP2's hooks unshard
    the root group (embeddings, final norm, output head) before use and reduce its gradients after.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: VarlenBatch) -> torch.Tensor:
        return micro_batch_loss_sum(self.model, batch)


def shard_fsdp(model: nn.Module, device: torch.device) -> VarlenLoss:
    """Apply FSDP2 to ``model`` in place (one group per decoder layer, one root) and return the root.

    On GPU, parameters are gathered in bf16 and gradients reduced in fp32; the fp32 shards stay the
    optimizer's master weights. On CPU everything stays fp32 (the exact reference the tests compare).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in causal_lm(model).get_decoder().layers:
        fully_shard(layer, mp_policy=mp_policy)
    root = VarlenLoss(model)
    fully_shard(root, mp_policy=mp_policy)
    return root


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (a tied embedding and output head)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def full_model_state(model: nn.Module) -> dict:
    """Unsharded weights (keyed by parameter name, one copy of tied ones) on rank 0, on the CPU; ``{}``
    on the other ranks. Every rank must call it (it gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    # One copy of a tied tensor: safetensors refuses two names for one storage.
    for names in tied_names(model):
        for name in names[1:]:
            model_state.pop(name, None)
    return model_state


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """:func:`full_model_state` and the optimizer's unsharded state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=options)


def set_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """Load unsharded state dicts (as :func:`full_state` returns them) into a sharded or plain model;
    every rank passes the whole dicts and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_state = dict(model_state)
    for names in tied_names(model):
        present = [n for n in names if n in model_state]
        for name in names:
            if present:
                model_state.setdefault(name, model_state[present[0]])
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
