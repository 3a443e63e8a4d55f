"""`train check`: a numerical proof that documents packed into one row cannot see each other.

For a sample of rows holding two or more segments, the row is run once through the trainer's own
attention path (the loader's ``batch_from_rows``, ``forward_hidden``), and every segment is run alone.
If attention is confined to the segment, each token's logits are the same either way, up to round-off;
any cross-document leak shows up as a difference. The check reports the maximum absolute logit
difference per row and fails when it exceeds ``tolerance * max(1, max |logit|)``, with a relative
tolerance that depends on the compute dtype: float64 on CPU (so round-off cannot reach the tolerance on
any CPU's kernels), bf16 autocast on GPU.

``--negative-control`` runs the packed row the naive way instead (one causal mask over the whole row,
position ids restarting per document). That setup leaks, and the check must fail on it: a check that
passes a leaky setup proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import UserError
from shared.reader import PackedDataset, Split

RELATIVE_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
"""Allowed |logit difference| / max(1, max |logit|), by compute dtype. Round-off alone stays below
these (float64: about 1e-15; bf16: a few units of its 2^-8 precision); a leak is orders of magnitude
above. float32 is kept for a caller's own model: on one Intel CPU a packed row and its segments alone
were seen to differ by 4e-3 in fp32 in one process of thirty, so the CPU check runs in float64."""


class CheckError(UserError):
    """The check cannot run on this dataset as asked."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckConfig:
    data: Path
    """Packed dataset folder (`prep pack --out`)."""
    model: str = "tiny-qwen2"
    """A Hugging Face model folder, or `tiny-qwen2` (random weights, the dataset's vocabulary)."""
    attn: str = "auto"
    split: str = "train"
    num_rows: int = 4
    """Rows with at least two segments to check."""
    seed: int = 0
    """Chooses the rows, and the weights of a built-in model."""
    device: str = "auto"
    negative_control: bool = False
    """Run the packed row with a plain causal mask (leaky on purpose); the check must then fail."""
    tolerance: float | None = None
    """Relative tolerance; default by dtype (`RELATIVE_TOLERANCE`)."""

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise CheckError(f"--num-rows {self.num_rows} must be at least 1.")
        if self.tolerance is not None and not self.tolerance > 0:
            raise CheckError(f"--tolerance {self.tolerance} must be positive.")


@dataclass(frozen=True, kw_only=True, slots=True)
class RowResult:
    row: int
    num_tokens: int
    num_segments: int
    max_abs_diff: float
    """Largest |logit(packed) - logit(segment alone)| over the row's tokens and the vocabulary."""
    logit_scale: float
    """Largest |logit| of the segments run alone, over the tokens compared (0 when none differed)."""
    tolerance: float
    """Absolute tolerance for this row: relative tolerance * max(1, logit_scale)."""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckResult:
    mode: str
    """``varlen`` (the trainer's path) or ``naive`` (the negative control)."""
    attn: str
    """The attention backend that ran (flash_attn, torch_varlen or sdpa)."""
    dtype: str
    relative_tolerance: float
    rows: tuple[RowResult, ...]
    num_rows_scanned: int
    num_single_segment_rows: int
    """Rows looked at and passed over because one segment cannot leak into another."""

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max((r.max_abs_diff for r in self.rows), default=float("nan"))


def pick_rows(split: Split, num_rows: int, seed: int, max_scan: int = 2000) -> tuple[list[int], int]:
    """Up to ``num_rows`` random rows holding two or more segments; also how many rows were scanned."""
    order = np.random.default_rng(seed).permutation(split.num_rows)[:max_scan]
    chosen = []
    for scanned, index in enumerate(order, start=1):
        if split.row(int(index)).num_segments >= 2:
            chosen.append(int(index))
            if len(chosen) == num_rows:
                return chosen, scanned
    return chosen, len(order)


def run_check(cfg: CheckConfig) -> CheckResult:
    """Load the dataset and model, compare packed and alone logits on sampled rows, return the record."""
    # torch and transformers load here, not at import, so that `train --help` stays instant.
    import torch

    from train.attention import backend_of
    from train.hardware import resolve_device
    from train.isolation import compare_row
    from train.loader import batch_from_rows
    from train.model import causal_lm, load_model

    dataset = PackedDataset(cfg.data, verify="checksum")
    split = dataset.split(cfg.split)
    device = resolve_device(cfg.device)
    dtype = "bfloat16" if device.type == "cuda" else "float64"
    model = load_model(
        cfg.model,
        vocab_size=dataset.manifest.tokenizer.vocab_size,
        attn=cfg.attn,
        lora=None,
        device=device,
        seed=cfg.seed,
        dtype=torch.float64 if dtype == "float64" else None,
    )
    model.eval()
    relative = cfg.tolerance or RELATIVE_TOLERANCE[dtype]
    indices, scanned = pick_rows(split, cfg.num_rows, cfg.seed)
    results = []
    for index in indices:
        batch = batch_from_rows([split.row(index)]).to(device)
        diff, scale = compare_row(model, batch, naive=cfg.negative_control)
        results.append(
            RowResult(
                row=index,
                num_tokens=batch.num_tokens,
                num_segments=batch.num_segments,
                max_abs_diff=diff,
                logit_scale=scale,
                tolerance=relative * max(1.0, scale),
            )
        )
    return CheckResult(
        mode="naive" if cfg.negative_control else "varlen",
        attn=backend_of(causal_lm(model)),
        dtype=dtype,
        relative_tolerance=relative,
        rows=tuple(results),
        num_rows_scanned=scanned,
        num_single_segment_rows=scanned - len(results),
    )
