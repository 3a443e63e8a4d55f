"""How fast a run goes: the FLOPs of a token, the device's peak, MFU, and the time left.

MFU (model FLOPs utilisation) = the FLOPs a step needs / its wall time / the device's peak. The FLOPs
are counted from the model actually built (:func:`train_flops_per_token`); the peak comes from a small
table of datasheet figures (:data:`PEAK_BF16_TFLOPS`) looked up by ``torch.cuda.get_device_name``. A
GPU not in the table is an "unknown GPU": its MFU is not printed rather than guessed. On the CPU there
is no MFU at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.reader import Split

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),  # SXM and PCIe alike
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 4080", 97.5),
    ("RTX 3090", 71.0),
)
"""Dense (not 2:4 sparse) bf16 tensor-core peaks with fp32 accumulation, from the vendors' datasheets,
by a substring of the device name; the first match wins, so a specific name comes before its family."""


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of ``device_name`` in FLOP/s, or None for a GPU not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def train_flops_per_token(model: nn.Module, *, mean_context: float) -> float:
    """FLOPs one trained token needs in a step: forward and backward, matmuls and attention.

    N is the weights of every ``nn.Linear`` in the model: the attention and MLP projections, LoRA's
    ``A`` and ``B`` matrices, and the output head (a tied head counts once, as a matmul; the embedding
    lookup is not a matmul). A weight costs 2 FLOPs per token forward and 2 for the gradient of its
    input; a trainable weight 2 more for its own gradient. So full fine-tuning is the usual 6N, and a
    LoRA step about 4N: the frozen base gets no weight gradients, and counting 6N would report an MFU
    50% higher than the work done. Attention adds ``4 * d_q * mean_context`` per layer forward (scores
    and the weighted sum over the keys a token sees; ``d_q`` = heads x head_dim), and twice that
    backward. Recomputation under gradient checkpointing is not counted: this is model FLOPs, not
    hardware FLOPs.
    """
    flops = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            flops += (6 if weight.requires_grad else 4) * weight.numel()
    config = model.config
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    flops += 3 * config.num_hidden_layers * 4 * num_heads * head_dim * mean_context
    return flops


def mean_causal_context(split: Split, max_rows: int = 256) -> float:
    """Keys a token attends to, on average over tokens: ``sum n(n+1)/2 / sum n`` over the segments of
    up to ``max_rows`` rows spread evenly across ``split`` (one read of their ``cu_seqlens``)."""
    indices = np.unique(np.linspace(0, split.num_rows - 1, num=min(max_rows, split.num_rows)).astype(int))
    pairs = tokens = 0
    for i in indices:
        lengths = np.diff(np.asarray(split.row(int(i)).cu_seqlens, dtype=np.int64))
        pairs += int((lengths * (lengths + 1) // 2).sum())
        tokens += int(lengths.sum())
    return pairs / max(tokens, 1)


def mfu(tok_per_s: float, flops_per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Share of the peak of all ``world_size`` devices that ``tok_per_s`` (over all ranks) uses."""
    if peak is None:
        return None
    return tok_per_s * flops_per_token / (peak * world_size)


@dataclass(slots=True)
class Pace:
    """The time left: the mean wall time of the training steps this process has taken times the steps
    left, plus the mean time of its evaluations times the evaluations left.

    Training and evaluation are timed apart (:meth:`timing`), so the step-0 evaluation, which comes
    before any step, is never read as the time of a step: it only prices the evaluations to come.
    A checkpoint's save counts with the training steps (it comes every ``--save-every`` of them).
    """

    first_step: int
    """The step this process started after (0, or the checkpoint's on resume)."""
    num_steps: int
    eval_every: int = 0
    """Evaluate every this many steps and after the last (0: never), as `train.loop.train` does."""
    train_s: float = 0.0
    """Wall time of the training steps taken (and checkpoints saved) in this process."""
    eval_s: float = 0.0
    num_evals: int = 0

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``what``: ``train`` or ``eval`` (one evaluation)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - began
            if what == "eval":
                self.eval_s += seconds
                self.num_evals += 1
            else:
                self.train_s += seconds

    def evals_left(self, step: int) -> int:
        """Evaluations still to run once ``step`` is trained: its own (when due) and every later one."""
        if not self.eval_every or step > self.num_steps:
            return 0
        due = self.num_steps // self.eval_every - (step - 1) // self.eval_every
        return due + (self.num_steps % self.eval_every != 0)

    def eta_s(self, step: int, train_s: float | None = None) -> float:
        """Seconds left after ``step``; ``train_s`` is the training time up to it (default: all of
        :attr:`train_s`; the loop, reading a window of steps at once, passes each step's share)."""
        done = max(step - self.first_step, 1)
        train_s = self.train_s if train_s is None else train_s
        eta = train_s / done * (self.num_steps - step)
        if self.num_evals:
            eta += self.eval_s / self.num_evals * self.evals_left(step)
        return eta


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``: two units at most."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def device_label(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)`` or ``cpu (16 threads)``."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads != 1 else ''})"
