"""What `train run --resume` may change, and the one error that lists everything it may not.

A resumed run must compute what the uninterrupted run would have computed from its checkpoint on. So
every option that enters the math of the remaining steps (the model and its adapter's shape, the
optimizer and its schedule, the run length, the seed, the rows of each step, the data) must equal the
checkpoint's; otherwise the run is refused, before any weight is loaded, with one message that lists
every difference and the flags that restore them. A new --lr is never half-applied (the optimizer
state would keep the old one while the record said the new one).

The options that decide only where, how fast, how often or against what the run is watched (device,
kernel, sharding, how a step's rows are split into micro-batches and ranks, logging, saving,
evaluation) may change: they apply from the resumed step on, and the run says so in metrics.jsonl
and in the ``resumes`` list of every later checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import UserError
from train.config import RunConfig
from train.runpaths import absolute_config, resolve_config

FIXED_ON_RESUME = (
    "model",
    "lora",
    "lora_r",
    "lora_alpha",
    "seed",
    "lr",
    "min_lr_ratio",
    "warmup_ratio",
    "weight_decay",
    "grad_clip",
    "token_budget",
    "max_steps",
    "init_adapter",
)
"""Options that must equal the checkpoint's: each changes what the remaining steps compute."""

APPLIED_ON_RESUME = (
    "data",  # the same rows are enforced by the train shards' checksums, not by the path
    "eval_data",
    "eval_every",
    "eval_max_tokens",
    "save_every",
    "log_every",
    "tensorboard",
    "wandb",
    "verify",
    "attn",
    "device",
    "fsdp",
    "batch_size",  # with grad_accum and ranks: the rows per step are enforced instead
    "grad_accum",
    "sample_prompt",
    "sample_tokens",
    "dtype",  # like device: the same math at another precision
    "grad_checkpointing",  # the same math, recomputed
    "compile",  # the same math in other kernels
    "keep_checkpoints",
)
"""Options a resumed run may change; the change is recorded with the step it applies from."""

NOT_COMPARED = ("out", "resume")


class ResumeError(UserError):
    """`train run --resume` was given options that would make the resumed run another run."""


def check_not_finished(checkpoint: Path, state: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse to "resume" a run whose newest checkpoint is its last step: there is nothing left to
    run, and a longer run is another schedule. Training further is a new stage, said explicitly."""
    stage = _next_stage(checkpoint, state, cfg)
    if stage is not None:
        raise ResumeError(
            f"`{cfg.out}` finished: its newest checkpoint {checkpoint.name} is its last step, so --resume has"
            f" nothing to continue. {stage}"
        )


def _next_stage(checkpoint: Path, state: dict[str, Any], cfg: RunConfig) -> str | None:
    """How to train a finished run further (None unless the checkpoint is its last step and the
    run exported its weights)."""
    step, num_steps = state.get("step"), state.get("num_steps")
    lora = state.get("config", {}).get("lora", True)
    export = cfg.out / ("adapter" if lora else "model")
    # Killed after its last checkpoint but before the export: resuming finishes it (runs no step).
    if step is None or num_steps is None or step < num_steps or not export.is_dir():
        return None
    start = f"--init-adapter {export}" if lora else f"--model {export}"
    return (
        f"To train further, start a new stage from its weights in a new --out: `train run --out NEW {start}"
        " --max-steps N ...` (fresh optimizer and lr schedule, from step 0)."
    )


def check_resume(
    checkpoint: Path,
    state: dict[str, Any],
    cfg: RunConfig,
    *,
    num_steps: int,
    num_warmup_steps: int,
    rows_per_step: int,
    world_size: int,
    data_fingerprint: str,
) -> dict[str, list]:
    """The applied changes (option -> [checkpoint's value, this run's]) of resuming ``cfg`` from
    ``state`` (the checkpoint's state.json); raises ResumeError listing every difference that is not
    allowed, with the fix."""
    saved = resolve_config(state.get("config") or {}, cfg.out)  # an old run's relative paths, rooted
    mine = jsonable_config(cfg)
    problems: list[str] = []
    restore: list[str] = []  # options to give again with the checkpoint's value
    drop: list[str] = []  # options the checkpoint's run did not have
    lora_in_either = saved.get("lora", True) or cfg.lora
    for name in FIXED_ON_RESUME:
        if name in ("lora_r", "lora_alpha") and not lora_in_either:
            continue  # full fine-tuning on both sides: there is no adapter to shape
        if name in saved and saved[name] != mine[name]:
            problems.append(
                f"{_flag(name)} was {_show(name, saved[name])} in the checkpoint, now {_show(name, mine[name])}"
            )
            (drop if saved[name] is None else restore).append(name)
    fixes = []
    if restore or drop:
        fix = "resume"
        if restore:
            fix += " with " + " ".join(_setting(name, saved[name]) for name in restore)
        if drop:
            fix += " without " + " and ".join(_flag(name) for name in drop)
        fixes.append(fix)

    saved_rows = state.get("loader", {}).get("rows_per_step")
    if saved_rows is not None and saved_rows != rows_per_step:
        problems.append(
            f"the rows per step were {_rows(saved, state.get('world_size'), saved_rows)} in the checkpoint,"
            f" now {_rows(mine, world_size, rows_per_step)}"
        )
        fixes.append(
            f"set --batch-size and --grad-accum so that batch_size x grad_accum x ranks (torchrun --nnodes x"
            f" --nproc-per-node) is {saved_rows} again, e.g. 2 ranks x --grad-accum 1 -> 1 rank x --grad-accum 2"
        )
    if state.get("data_fingerprint") != data_fingerprint:
        problems.append(
            f"the checkpoint was trained on other data (the train shards of --data `{cfg.data}` have other"
            " checksums)"
        )
        fixes.append("give the checkpoint's dataset as --data")
    plan = (state.get("num_steps"), state.get("num_warmup_steps"))
    if not problems and None not in plan and plan != (num_steps, num_warmup_steps):  # no config saved
        problems.append(
            f"the checkpoint belongs to a run of {plan[0]:,} steps ({plan[1]:,} warmup), this run plans"
            f" {num_steps:,} ({num_warmup_steps:,})"
        )
        fixes.append("resume with the same --token-budget/--max-steps and --warmup-ratio")
    if problems:
        raise ResumeError(
            f"cannot resume `{cfg.out}` from {checkpoint.name}: {'; '.join(problems)}. A resumed run must"
            f" compute what the interrupted one would have: {'; '.join(fixes)}. Or start a new --out to"
            " train with the new values."
            + (f" This run finished. {stage}" if (stage := _next_stage(checkpoint, state, cfg)) else "")
        )
    return {
        name: [saved[name], mine[name]]
        for name in APPLIED_ON_RESUME
        if name in saved and saved[name] != mine[name]
    }


def _flag(name: str) -> str:
    return "--lora/--no-lora" if name == "lora" else f"--{name.replace('_', '-')}"


def _setting(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"{_flag(name)} {value}"


def _show(name: str, value: Any) -> str:
    if value is None:
        return "not given"
    return _setting(name, value) if isinstance(value, bool) else str(value)


def _rows(config: dict[str, Any], world_size: Any, rows_per_step: int) -> str:
    return (
        f"batch_size {config.get('batch_size')} x grad_accum {config.get('grad_accum')} x {world_size} ranks"
        f" = {rows_per_step} rows per step"
    )


def jsonable_config(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as it is stored in a checkpoint's state.json: paths as strings, those of the inputs
    absolute (`train.runpaths`), so that the run's files are found from any folder."""
    return absolute_config({name: _jsonable(getattr(cfg, name)) for name in cfg.__dataclass_fields__})


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):  # eval_data's (name, path) pairs: NAME=PATH, as on the command line;
        # none is null, as checkpoints wrote it before eval sets had names
        return [f"{v[0]}={v[1]}" if isinstance(v, tuple) else _jsonable(v) for v in value] or None
    return value
