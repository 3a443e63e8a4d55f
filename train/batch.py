"""The packed micro-batch record that the loader produces and the model, loss and checks consume.

A micro-batch is one flat ``[1, T]`` stream: its rows are concatenated and their segment boundaries
become one global ``cu_seqlens``. For two rows, ``[A A A E | B B E]`` and ``[C C C C E]`` (E = EOS)::

    input_ids     [[a0 a1 a2 E  b0 b1 E  c0 c1 c2 c3 E ]]
    labels        [[-  a1 a2 E  -  b1 E  -  c1 c2 c3 E ]]     (- = -100, never a target)
    position_ids  [[0  1  2  3  0  1  2  0  1  2  3  4 ]]
    cu_seqlens    [0, 4, 7, 12]                              (int32, one entry per segment + 1)
    max_seqlen    5                                          (Python int: longest segment)
    num_target_tokens  9                                     (labels != -100)

Attention is restricted to the blocks that ``cu_seqlens`` delimits; nothing is padded, and the model
never infers boundaries from ``position_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class VarlenBatch:
    input_ids: torch.Tensor
    """int64 ``[1, T]``."""
    labels: torch.Tensor
    """int64 ``[1, T]``, unshifted (Hugging Face convention), -100 where no target."""
    position_ids: torch.Tensor
    """int64 ``[1, T]``, 0..n-1 within each segment (for RoPE only, never for isolation)."""
    cu_seqlens: torch.Tensor
    """int32 ``[num_segments + 1]``, starts at 0, strictly increasing, ends at T."""
    max_seqlen: int
    num_target_tokens: int
    """Tokens whose label is not -100 (after the model's shift, the same count: a segment's first
    label is always -100, so shifting never pairs a token with the next segment's first token)."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = True) -> VarlenBatch:
        return VarlenBatch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
            max_seqlen=self.max_seqlen,
            num_target_tokens=self.num_target_tokens,
        )
