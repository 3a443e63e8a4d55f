"""`train run`: one explicit training loop over packed varlen micro-batches, readable top to bottom.

Each optimizer step takes ``grad_accum`` micro-batches from the loader. Its loss is the sum of every
target token's cross-entropy over ALL those micro-batches (and all ranks) divided by their total target
count, so that every target token weighs the same however the step is split into micro-batches or
ranks. (Averaging per-micro-batch means instead would over-weight the tokens of sparse micro-batches.)
The count is known on the host before the forward pass (the loader counts labels), so each micro-batch's
loss sum is scaled by ``1 / num_step_targets`` and backpropagated at once.

Distributed (``torchrun``, any backend): each rank reads its own share of the rows, the target count
is all-reduced before the step, and the gradients are summed across ranks after it: by bucketed
all-reduces of the trainable gradients (replicated model, LoRA), or by FSDP2's reduce-scatter
(``--fsdp``, full fine-tuning); see `train.parallel`. Only rank 0 logs and writes files.

The loop in :func:`train` reads in one screen: :func:`setup` builds everything (and restores a
checkpoint after :func:`train.resume.check_resume` has accepted the options), then each step is
:func:`train_step`, :func:`log_step`, :func:`save` when due and :func:`evaluate_run` when due;
:func:`finish` exports the weights and the loss plot.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from shared.errors import DatasetError, UserError
from shared.manifest import SplitInfo
from shared.reader import PackedDataset, Split
from train.batch import VarlenBatch
from train.checkpoint import latest_checkpoint, read_checkpoint_state, restore_checkpoint, save_checkpoint
from train.config import RunConfig
from train.loader import Loader, batch_from_rows, sequential_batches
from train.loss import micro_batch_loss_sum
from train.model import LoraSettings, input_embeddings, load_model, resolve_device
from train.outputs import (
    LOSS_PLOT,
    METRICS,
    export_weights,
    make_out_folder,
    memory_bytes,
    open_metrics,
    plot_losses,
)
from train.parallel import (
    all_reduce_grads,
    all_reduce_sum,
    dist_info,
    full_model_state,
    full_state,
    shard_fsdp,
)
from train.plan import DataShape, RunPlan, describe, lr_factor, make_plan
from train.resume import check_resume, jsonable_config


@dataclass(slots=True)
class RunResult:
    plan: RunPlan
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step taken in this call (1-based step numbers)."""
    eval_losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    export: Path | None = None
    """The final adapter (peft ``save_pretrained``) or model folder."""


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one optimizer step did, over all ranks: the figures of its metrics.jsonl record."""

    loss: float
    """Mean cross-entropy per target token of the step."""
    lr: float
    """The learning rate the step was taken with."""
    grad_norm: float
    """Global gradient norm before clipping."""
    num_tokens: int
    num_target_tokens: int
    tok_per_s: float
    """The step's tokens per second of its own wall time (evaluation and checkpoints not counted)."""


@dataclass(kw_only=True, slots=True)
class Run:
    """A run set up to take its next step: what :func:`setup` builds and the loop's functions share."""

    cfg: RunConfig
    plan: RunPlan
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    loss_fn: Callable[[VarlenBatch], torch.Tensor]
    """A micro-batch's loss sum: through the FSDP root's forward (its hooks gather the shards), or
    straight through the model."""
    params: list[torch.nn.Parameter]
    """The trainable parameters."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Loader
    eval_split: Split | None
    data_fingerprint: str
    """sha256 over the train shards' checksums: a checkpoint's loader position means something only
    for the same rows in the same shards."""
    log: Callable[[str], None]
    start_step: int = 0
    resumes: list[dict] = field(default_factory=list)
    """Every resume of this run so far: its step, its checkpoint and the options it changed."""
    metrics: TextIO | None = None
    """metrics.jsonl, open on rank 0."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, line: str) -> None:
        if self.is_main:
            self.log(line)

    def record(self, entry: dict) -> None:
        """Append ``entry`` to metrics.jsonl on rank 0, flushed so that a killed run keeps its steps."""
        if self.metrics is not None:
            self.metrics.write(json.dumps(entry) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        self.loader.close()
        if self.metrics is not None:
            self.metrics.close()


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> RunResult:
    """Run ``cfg`` to its last step (or from its newest checkpoint with ``cfg.resume``)."""
    run = setup(cfg, log)
    result = RunResult(plan=run.plan)
    try:
        for step in range(run.start_step + 1, run.plan.num_steps + 1):
            stats = train_step(run)
            result.losses[step] = stats.loss
            log_step(run, step, stats)
            is_last = step == run.plan.num_steps
            # Save before evaluating: a slow or failing eval never costs the steps since the last save.
            if is_last or (cfg.save_every and step % cfg.save_every == 0):
                result.last_checkpoint = save(run, step)
            if run.eval_split is not None and cfg.eval_every and (step % cfg.eval_every == 0 or is_last):
                result.eval_losses[step] = evaluate_run(run, step)
    finally:
        run.close()
    result.export = finish(run)
    return result


def setup(cfg: RunConfig, log: Callable[[str], None]) -> Run:
    """Everything before the first step: the run folder, the data and its plan, the model, optimizer
    and loader; with ``cfg.resume``, the newest checkpoint (once its options are accepted); metrics.jsonl."""
    rank, world_size = dist_info()
    say = log if rank == 0 else (lambda _: None)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if rank == 0:
        make_out_folder(cfg.out)
    dataset, train_split, eval_split = open_data(cfg)
    manifest = dataset.manifest
    info = manifest.splits["train"]
    plan = plan_run(cfg, manifest.seq_len, info, world_size)
    for line in describe(plan):
        say(line)

    model = build_model(cfg, manifest.tokenizer.vocab_size, device)
    if cfg.fsdp and world_size == 1:
        raise UserError(
            "--fsdp shards the model over ranks, but this is a single process; start it with torchrun"
            " --nproc-per-node N (N > 1), or drop --fsdp."
        )
    loss_fn = shard_fsdp(model, device) if cfg.fsdp else partial(micro_batch_loss_sum, model)
    params = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)
    say(
        f"model {cfg.model}: {num_trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    # Dropout (if the model has any) draws from the global generator: seed it per rank.
    torch.manual_seed(cfg.seed + rank)
    optimizer, scheduler = build_optimizer(cfg, params, plan)
    loader = Loader(
        train_split,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        device=device,
        max_row_tokens=manifest.seq_len,
    )
    run = Run(
        cfg=cfg,
        plan=plan,
        rank=rank,
        world_size=world_size,
        device=device,
        model=model,
        loss_fn=loss_fn,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        eval_split=eval_split,
        data_fingerprint=hashlib.sha256("".join(sh.sha256 for sh in info.shards).encode()).hexdigest(),
        log=log,
    )
    if cfg.resume:
        resume_from_checkpoint(run)
    if run.is_main:
        run.metrics = open_metrics(cfg.out / METRICS, keep_through=run.start_step)
        if cfg.resume:  # the record says where the run restarted, and what it ran differently from there
            last = run.resumes[-1]
            run.record(
                {"step": run.start_step, "resumed_from": last["checkpoint"], "changed": last["changed"]}
            )
    return run


def train_step(run: Run) -> StepStats:
    """One optimizer step: ``grad_accum`` micro-batches, one normalisation (the module docstring's),
    gradients summed over ranks, clipped, then AdamW and the lr schedule."""
    cfg = run.cfg
    t_start = time.perf_counter()
    micro_batches: list[VarlenBatch] = [next(run.loader) for _ in range(cfg.grad_accum)]
    counts = torch.tensor(
        [sum(b.num_target_tokens for b in micro_batches), sum(b.num_tokens for b in micro_batches)],
        dtype=torch.float64,
        device=run.device,
    )
    num_step_targets, num_step_tokens = (int(v) for v in all_reduce_sum(counts).tolist())
    # FSDP averages gradients over ranks; our loss is already divided by the targets of ALL ranks.
    loss_scale = run.world_size if cfg.fsdp else 1
    step_loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, batch in enumerate(micro_batches):
        if cfg.fsdp:  # reduce-scatter once per step, after the last micro-batch
            run.loss_fn.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss_sum = run.loss_fn(batch)
        # Each rank's sum over its targets / the step's targets on ALL ranks; summing the
        # gradients over ranks then gives the gradient of the global mean.
        (loss_sum * (loss_scale / max(num_step_targets, 1))).backward()
        step_loss_sum += loss_sum.detach().double()
    if not cfg.fsdp:
        all_reduce_grads(run.params)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    loss = float(all_reduce_sum(step_loss_sum)) / max(num_step_targets, 1)
    tok_per_s = num_step_tokens / max(time.perf_counter() - t_start, 1e-9)
    return StepStats(
        loss=loss,
        lr=lr,
        grad_norm=float(grad_norm),
        num_tokens=num_step_tokens,
        num_target_tokens=num_step_targets,
        tok_per_s=tok_per_s,
    )


def log_step(run: Run, step: int, stats: StepStats) -> None:
    """The step's metrics.jsonl record, and a log line every ``log_every`` steps and at the last."""
    if not run.is_main:
        return
    mem = memory_bytes(run.device)
    run.record(
        {
            "step": step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens": stats.num_tokens,
            "target_tokens": stats.num_target_tokens,
            "tok_per_s": stats.tok_per_s,
            "mem_bytes": mem,
        }
    )
    if step % run.cfg.log_every == 0 or step == run.plan.num_steps:
        run.say(
            f"step {step:>6,}/{run.plan.num_steps:,} | loss {stats.loss:.4f} | lr {stats.lr:.2e}"
            f" | targets {stats.num_target_tokens:,} | tok/s {stats.tok_per_s:>9,.0f} | mem {mem / 2**30:.2f} GiB"
        )


def save(run: Run, step: int) -> Path | None:
    """Checkpoint the run after ``step``; every rank takes part, rank 0 writes and gets the folder."""
    # Full fine-tuning saves by parameter name (resumable on any number of ranks, FSDP or not);
    # under FSDP every rank takes part in gathering the shards.
    full = None if run.cfg.lora else full_state(run.model, run.optimizer)
    path = None
    if run.is_main:
        path = save_checkpoint(
            run.cfg.out,
            step=step,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            loader_state=run.loader.state_dict(),
            extra={
                "num_steps": run.plan.num_steps,
                "num_warmup_steps": run.plan.num_warmup_steps,
                "data_fingerprint": run.data_fingerprint,
                "config": jsonable_config(run.cfg),
                "resumes": run.resumes,
                "world_size": run.world_size,
            },
            full=full,
        )
    if run.world_size > 1:
        dist.barrier()
    return path


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: Split,
    *,
    batch_size: int,
    device: torch.device,
    loss_fn: Callable[[VarlenBatch], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> float:
    """Mean cross-entropy over every target token of the split (all ranks), the training normalisation.

    ``loss_fn`` computes a micro-batch's loss sum (the FSDP root under --fsdp); default: ``model``'s.
    ``lockstep``: every rank runs as many forwards as the busiest one (FSDP gathers parameters with
    collectives, so a rank with one batch fewer would leave the others waiting forever); the extra
    forwards are not counted.
    """
    rank, world_size = dist_info()
    loss_fn = loss_fn or partial(micro_batch_loss_sum, model)
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    num_batches = math.ceil(len(range(rank, split.num_rows, world_size)) / batch_size)
    num_extra = 0
    if lockstep and world_size > 1:
        # Agreed before the first forward: collectives must pair up in the same order on every rank.
        most = torch.tensor([num_batches], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        num_extra = int(most) - num_batches
    for batch in sequential_batches(split, batch_size=batch_size, rank=rank, world_size=world_size):
        totals[0] += loss_fn(batch.to(device)).double()
        totals[1] += batch.num_target_tokens
    for _ in range(num_extra):
        loss_fn(batch_from_rows([split.row(0)]).to(device))
    model.train()
    all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def evaluate_run(run: Run, step: int) -> float:
    """:func:`evaluate` on the run's eval split after ``step``, recorded and logged."""
    split = run.eval_split
    eval_loss = evaluate(
        run.model,
        split,
        batch_size=run.cfg.batch_size,
        device=run.device,
        loss_fn=run.loss_fn,
        lockstep=run.cfg.fsdp,
    )
    run.record({"step": step, "eval_loss": eval_loss})
    run.say(f"eval step {step:,} | loss {eval_loss:.4f} ({split.name}, {split.num_rows:,} rows)")
    return eval_loss


def finish(run: Run) -> Path | None:
    """Export the trained weights and plot the losses; the export's folder on rank 0."""
    # Under FSDP the exported weights are gathered from every rank first.
    export_state = full_model_state(run.model) if run.cfg.fsdp else None
    if not run.is_main:
        return None
    export = export_weights(run.model, run.cfg.out, state_dict=export_state)
    plot_losses(run.cfg.out / METRICS, run.cfg.out / LOSS_PLOT)
    run.say(f"wrote {export}, {run.cfg.out / METRICS}, {run.cfg.out / LOSS_PLOT}")
    return export


# -- setup's parts ---------------------------------------------------------------------------------


def open_data(cfg: RunConfig) -> tuple[PackedDataset, Split, Split | None]:
    """The train split, and the split evaluated on (if any); shards are verified before training."""
    dataset = PackedDataset(cfg.data, verify=cfg.verify)
    train_split = dataset.split("train")
    if cfg.eval_data is not None:
        eval_set = PackedDataset(cfg.eval_data, verify=cfg.verify)
        if eval_set.manifest.tokenizer.sha256 != dataset.manifest.tokenizer.sha256:
            raise DatasetError(
                f"--eval-data `{cfg.eval_data}` was packed with another tokenizer"
                f" ({eval_set.manifest.tokenizer.path}) than --data ({dataset.manifest.tokenizer.path});"
                " pack both with the same tokenizer."
            )
        eval_split = eval_set.split("val" if "val" in eval_set.split_names else "train")
    elif "val" in dataset.split_names:
        eval_split = dataset.split("val")
    else:
        eval_split = None
    return dataset, train_split, eval_split


def build_model(cfg: RunConfig, vocab_size: int, device: torch.device) -> torch.nn.Module:
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora else None
    model = load_model(
        cfg.model, vocab_size=vocab_size, attn=cfg.attn, lora=lora, device=device, seed=cfg.seed
    )
    num_embeddings = input_embeddings(model).num_embeddings
    if num_embeddings < vocab_size:
        raise UserError(
            f"--model `{cfg.model}` embeds {num_embeddings:,} token ids but the dataset's tokenizer has"
            f" {vocab_size:,} (manifest.tokenizer.vocab_size); pack the data with this model's tokenizer."
        )
    return model


def plan_run(cfg: RunConfig, seq_len: int, info: SplitInfo, world_size: int) -> RunPlan:
    """The run's steps and warmup over the train split ``info``, as `train plan` prints them."""
    return make_plan(
        batch_size=cfg.batch_size,
        seq_len=seq_len,
        grad_accum=cfg.grad_accum,
        world_size=world_size,
        token_budget=cfg.token_budget,
        max_steps=cfg.max_steps,
        warmup_ratio=cfg.warmup_ratio,
        data=DataShape(
            num_rows=info.num_rows, num_tokens=info.num_tokens, num_target_tokens=info.num_target_tokens
        ),
    )


def build_optimizer(
    cfg: RunConfig, params: list[torch.nn.Parameter], plan: RunPlan
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its warmup + cosine schedule (`train.plan.lr_factor`)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    schedule = partial(
        lr_factor,
        num_steps=plan.num_steps,
        num_warmup_steps=plan.num_warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def resume_from_checkpoint(run: Run) -> None:
    """Restore the newest checkpoint in --out into ``run``, once `train.resume.check_resume` has
    accepted this run's options (it refuses what would change the math)."""
    path = latest_checkpoint(run.cfg.out)
    state = read_checkpoint_state(path)
    changed = check_resume(
        path,
        state,
        run.cfg,
        num_steps=run.plan.num_steps,
        num_warmup_steps=run.plan.num_warmup_steps,
        rows_per_step=run.loader.rows_per_step,
        world_size=run.world_size,
        data_fingerprint=run.data_fingerprint,
    )
    restore_checkpoint(path, state, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    run.loader.load_state_dict(state["loader"])
    run.start_step = state["step"]
    run.resumes = [
        *state.get("resumes", []),
        {"step": run.start_step, "checkpoint": path.name, "changed": changed},
    ]
    run.say(f"resumed from {path} at step {run.start_step:,}")
    for name, (before, now) in changed.items():
        run.say(f"  {name}: {before} -> {now} from step {run.start_step + 1:,} on")
