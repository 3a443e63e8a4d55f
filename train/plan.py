"""What a run will do before it runs: tokens per step, steps, warmup, tokens used, epochs over the data.

Budget semantics are by capacity, so a plan needs no data: a step holds ``batch_size * seq_len`` token
slots per micro-batch, times ``grad_accum`` micro-batches, times ``world_size`` ranks. Packed rows are
not always full, so the tokens a step actually trains on are at most that (`train run` logs the real count).

    tokens_per_step = batch_size * seq_len * grad_accum * world_size
    steps           = floor(token_budget / tokens_per_step)      (or --max-steps)
    warmup_steps    = floor(warmup_ratio * steps)
    tokens_used     = steps * tokens_per_step                    (<= token_budget)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.errors import UserError


class PlanError(UserError):
    """The requested run cannot take a single step, or its options contradict each other."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataShape:
    """The facts about a packed split that a plan needs (from its manifest; nothing is read)."""

    num_rows: int
    num_tokens: int
    num_target_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RunPlan:
    batch_size: int
    seq_len: int
    grad_accum: int
    world_size: int
    token_budget: int | None
    num_steps: int
    num_warmup_steps: int
    data: DataShape | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * self.world_size

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def tokens_used(self) -> int:
        return self.num_steps * self.tokens_per_step

    @property
    def steps_per_epoch(self) -> int | None:
        """Full steps in one pass; the last ``num_rows % rows_per_step`` rows of each shuffled pass are
        left out (a different set every epoch)."""
        return None if self.data is None else self.data.num_rows // self.rows_per_step

    @property
    def epochs(self) -> float | None:
        if self.data is None:
            return None
        return self.num_steps * self.rows_per_step / self.data.num_rows


def make_plan(
    *,
    batch_size: int,
    seq_len: int,
    grad_accum: int = 1,
    world_size: int = 1,
    token_budget: int | None = None,
    max_steps: int | None = None,
    warmup_ratio: float = 0.0,
    data: DataShape | None = None,
) -> RunPlan:
    if (token_budget is None) == (max_steps is None):
        raise PlanError(
            f"give exactly one of `--token-budget` and `--max-steps` (got {token_budget}, {max_steps})."
        )
    for flag, value in (
        ("--batch-size", batch_size),
        ("--seq-len", seq_len),
        ("--grad-accum", grad_accum),
        ("--world-size", world_size),
    ):
        if value < 1:
            raise PlanError(f"{flag} {value} must be at least 1.")
    if not 0.0 <= warmup_ratio < 1.0:
        raise PlanError(f"--warmup-ratio {warmup_ratio} must be in [0, 1).")
    tokens_per_step = batch_size * seq_len * grad_accum * world_size
    num_steps = max_steps if max_steps is not None else token_budget // tokens_per_step
    if num_steps < 1:
        raise PlanError(
            f"--token-budget {token_budget:,} is less than one step of {tokens_per_step:,} tokens"
            f" (batch {batch_size} x seq_len {seq_len} x grad_accum {grad_accum} x world {world_size});"
            " raise the budget or shrink --batch-size / --grad-accum."
        )
    if data is not None and data.num_rows < batch_size * grad_accum * world_size:
        raise PlanError(
            f"the train split has {data.num_rows:,} rows, fewer than one step needs"
            f" ({batch_size} rows x grad_accum {grad_accum} x world {world_size}); lower --batch-size."
        )
    return RunPlan(
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accum=grad_accum,
        world_size=world_size,
        token_budget=token_budget,
        num_steps=num_steps,
        num_warmup_steps=math.floor(warmup_ratio * num_steps),
        data=data,
    )


def describe(plan: RunPlan) -> list[str]:
    """The plan as aligned lines for a terminal."""
    lines = [
        f"tokens per step  {plan.tokens_per_step:>15,}  (batch {plan.batch_size} rows x seq_len"
        f" {plan.seq_len:,} x grad_accum {plan.grad_accum} x world {plan.world_size})",
        f"steps            {plan.num_steps:>15,}",
        f"warmup steps     {plan.num_warmup_steps:>15,}",
        f"tokens used      {plan.tokens_used:>15,}"
        + (f"  of budget {plan.token_budget:,}" if plan.token_budget is not None else ""),
    ]
    if plan.data is not None:
        d = plan.data
        fill = d.num_tokens / max(1, d.num_rows * plan.seq_len)
        lines += [
            f"train split      {d.num_rows:>15,} rows, {d.num_tokens:,} tokens"
            f" ({fill:.1%} of capacity), {d.num_target_tokens:,} targets",
            f"steps per epoch  {plan.steps_per_epoch:>15,}"
            f"  ({d.num_rows % plan.rows_per_step:,} rows per epoch left out by the shuffle)",
            f"epochs           {plan.epochs:>15.2f}",
        ]
    return lines


def lr_factor(step: int, *, num_steps: int, num_warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup reaches the peak on its last step (``(step + 1) / warmup``) so that no step trains at lr 0;
    the cosine then falls from 1 to ``min_lr_ratio`` over the remaining steps.
    """
    if step < num_warmup_steps:
        return (step + 1) / num_warmup_steps
    decay_steps = max(1, num_steps - num_warmup_steps - 1)
    progress = min(1.0, (step - num_warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
