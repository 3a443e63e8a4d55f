"""`train run`: one explicit training loop over packed varlen micro-batches, readable top to bottom.

Each optimizer step takes ``grad_accum`` micro-batches from the loader. Its loss is the sum of every
target token's cross-entropy over ALL those micro-batches (and all ranks) divided by their total target
count, so that every target token weighs the same however the step is split into micro-batches or
ranks. (Averaging per-micro-batch means instead would over-weight the tokens of sparse micro-batches.)
The count is known on the host before the forward pass (the loader counts labels), so each micro-batch's
loss sum is scaled by ``1 / num_step_targets`` and backpropagated at once.

No host synchronisation in a step. Reading a device tensor (``.item()``, ``float()``, ``.tolist()``)
makes the CPU wait for the GPU, which then idles while Python launches the next kernels. So a step's
loss sum and gradient norm stay device tensors in its :class:`StepStats`, queued by :func:`log_step`;
:func:`read_steps` brings every queued step's figures to the host in one transfer when a person or a
file needs them: at a log line (every ``log_every`` steps), before a checkpoint or an eval, and at the
end. metrics.jsonl still gets one record per step, in order, before the checkpoint or eval of a later
step; tokens/s is measured over the window between two reads, which is exact where a step's own host
time is not.

Distributed (``torchrun``, any backend): each rank reads its own share of the rows, the target count
is all-reduced before the step (one collective per step, its result left on the device), and the
gradients are summed across ranks after it: by bucketed
all-reduces of the trainable gradients (replicated model, LoRA), or by FSDP2's reduce-scatter
(``--fsdp``, full fine-tuning); see `train.parallel`. Only rank 0 logs and writes files.

The loop in :func:`train` reads in one screen: :func:`setup` builds everything (and restores a
checkpoint after :func:`train.resume.check_resume` has accepted the options), then each step is
:func:`train_step`, :func:`log_step`, :func:`save` when due and :func:`evaluate_run` when due (and
once before the first step); :func:`finish` exports the weights and the loss plot. What an eval
computes (packed perplexity over each named eval set) is `train.eval`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from train.attention import choose_attn
from train.batch import VarlenBatch
from train.checkpoint import (
    init_adapter,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint_state,
    restore_checkpoint,
    save_checkpoint,
    step_dir,
)
from train.config import RunConfig
from train.eval import EvalFigures, FirstRows, evaluate_split, rows_within
from train.hardware import auto_device, resolve_device, sum_dtype
from train.loader import Loader
from train.loss import micro_batch_loss_sum
from train.model import LoraSettings, causal_lm, input_embeddings, load_model
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
from train.plan import DataShape, RunPlan, lr_factor, make_plan
from train.resume import check_not_finished, check_resume, jsonable_config
from train.runinfo import RunInfo, describe_run, header_lines, step_line, warning_lines, write_run_json
from train.samples import log_samples
from train.sinks import Sinks, open_sinks, require_sinks
from train.throughput import Pace, mean_causal_context, train_flops_per_token
from train.tokenizer_files import dataset_tokenizer


@dataclass(slots=True)
class RunResult:
    plan: RunPlan
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step taken in this call (1-based step numbers)."""
    eval_losses: dict[int, float] = field(default_factory=dict)
    """Eval loss of the first eval set (`val` by default) at each eval step (0: before training)."""
    eval_set_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    """Eval loss of every eval set, by name, at each eval step."""
    last_checkpoint: Path | None = None
    export: Path | None = None
    """The final adapter (peft ``save_pretrained``) or model folder."""


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one optimizer step did, over all ranks, as the step leaves it: the tensors stay on the
    device until :func:`read_steps` reads a window of steps at once."""

    loss_sum: torch.Tensor
    """Summed cross-entropy over every target token of the step (all ranks), 0-d, ``sum_dtype``."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping, 0-d."""
    lr: float
    """The learning rate the step was taken with."""
    num_tokens: int | torch.Tensor
    num_target_tokens: int | torch.Tensor
    """Host ints in one process (the loader counted them); on several ranks 0-d device tensors, summed
    by the step's all-reduce and read with the rest."""


@dataclass(frozen=True, slots=True)
class PendingStep:
    """A step taken but not yet read back: its stats and what the host knew of it then."""

    step: int
    stats: StepStats
    mem_bytes: int


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
    eval_sets: dict[str, Split | FirstRows]
    """The eval sets by name (`val`: --data's val split, unless --eval-data names a set so)."""
    data_fingerprint: str
    """sha256 over the train shards' checksums: a checkpoint's loader position means something only
    for the same rows in the same shards."""
    log: Callable[[str], None]
    start_step: int = 0
    resumes: list[dict] = field(default_factory=list)
    """Every resume of this run so far: its step, its checkpoint and the options it changed."""
    metrics: TextIO | None = None
    """metrics.jsonl, open on rank 0."""
    info: RunInfo | None = None
    """What runs (device, dtypes, attention, parameters, plan): the header lines and run.json."""
    sinks: Sinks = field(default_factory=Sinks)
    """TensorBoard and W&B, when on (rank 0): they get every record metrics.jsonl gets."""
    pace: Pace | None = None
    """The time left (`train.throughput.Pace`): training steps and evaluations timed apart."""
    pending: list[PendingStep] = field(default_factory=list)
    """Steps whose figures are still on the device (:func:`read_steps`)."""
    losses: dict[int, float] = field(default_factory=dict)
    """The loss of every step read so far in this call (`RunResult.losses`)."""
    window_start: float = field(default_factory=time.perf_counter)
    """When the steps of the current read window began: the last read, checkpoint or eval."""

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
            self.sinks.write(entry)

    def refresh_outputs(self) -> None:
        """Redraw loss.png and flush the sinks (at each checkpoint and eval): a killed run keeps them."""
        if self.metrics is not None:
            plot_losses(self.cfg.out / METRICS, self.cfg.out / LOSS_PLOT)
            self.sinks.flush()

    def close(self) -> None:
        self.loader.close()
        if self.metrics is not None:
            self.metrics.close()
        self.sinks.close()


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> RunResult:
    """Run ``cfg`` to its last step (or from its newest checkpoint with ``cfg.resume``)."""
    run = setup(cfg, log)
    result = RunResult(plan=run.plan, losses=run.losses)
    evaluating = bool(run.eval_sets and cfg.eval_every)
    pace = run.pace = Pace(run.start_step, run.plan.num_steps, eval_every=cfg.eval_every if evaluating else 0)
    try:
        if evaluating and run.start_step == 0:  # the baseline every later eval is compared with
            with pace.timing("eval"):
                record_eval(result, 0, evaluate_run(run, 0))
        for step in range(run.start_step + 1, run.plan.num_steps + 1):
            log_step(run, step, train_step(run))  # read back (and recorded) at log points only
            is_last = step == run.plan.num_steps
            # Save before evaluating: a slow or failing eval never costs the steps since the last save.
            if is_last or (cfg.save_every and step % cfg.save_every == 0):
                read_steps(run)  # the steps' time is their window's; the save is timed on its own
                with pace.timing("train"):
                    result.last_checkpoint = save(run, step)
            if evaluating and (step % cfg.eval_every == 0 or is_last):
                read_steps(run)  # the steps' wait for the device is theirs, not the eval's
                with pace.timing("eval"):
                    record_eval(result, step, evaluate_run(run, step))
                    log_samples(run, step)
                run.window_start = time.perf_counter()  # the samples' generation is no step's either
    except BaseException:
        # The steps taken since the last read still get their records; the failure is what the
        # caller must see, so a second one while reading (a broken device) is not raised over it.
        with contextlib.suppress(Exception):
            read_steps(run)
        raise
    finally:
        run.close()
    result.export = finish(run)
    return result


def setup(cfg: RunConfig, log: Callable[[str], None]) -> Run:
    """Everything before the first step: the run folder, the data and its plan, the model, optimizer
    and loader; with ``cfg.resume``, the newest checkpoint (once its options are accepted); metrics.jsonl."""
    rank, world_size = dist_info()
    require_sinks(tensorboard=cfg.tensorboard, wandb=cfg.wandb)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if rank == 0:
        make_out_folder(cfg.out)
    dataset, train_split, eval_sets = open_data(cfg)
    manifest = dataset.manifest
    info = manifest.splits["train"]
    plan = plan_run(cfg, manifest.seq_len, info, world_size)

    model = build_model(cfg, manifest.tokenizer.vocab_size, device)
    initialised_from = None
    if cfg.init_adapter is not None and not cfg.resume:  # on resume the checkpoint holds the weights
        initialised_from = init_adapter(cfg.init_adapter, model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    if cfg.fsdp and world_size == 1:
        raise UserError(
            "--fsdp shards the model over ranks, but this is a single process; start it with torchrun"
            " --nproc-per-node N (N > 1), or drop --fsdp."
        )
    loss_fn = shard_fsdp(model, device) if cfg.fsdp else partial(micro_batch_loss_sum, model)
    params = [p for p in model.parameters() if p.requires_grad]
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
        eval_sets=eval_sets,
        data_fingerprint=hashlib.sha256("".join(sh.sha256 for sh in info.shards).encode()).hexdigest(),
        log=log,
    )
    announce(run, train_split)
    if initialised_from is not None:
        run.say(
            f"initialised the LoRA adapter from {initialised_from} (optimizer and lr schedule fresh, step 0)"
        )
    if cfg.resume:
        resume_from_checkpoint(run)
    if run.is_main:
        run.metrics = open_metrics(cfg.out / METRICS, keep_through=run.start_step)
        if cfg.resume:  # the record says where the run restarted, and what it ran differently from there
            last = run.resumes[-1]
            run.record(
                {
                    "step": run.start_step,
                    "kind": "resume",
                    "resumed_from": last["checkpoint"],
                    "changed": last["changed"],
                }
            )
        open_outputs(run)
    run.window_start = time.perf_counter()  # the first steps' tokens/s leaves the setup out
    return run


def train_step(run: Run) -> StepStats:
    """One optimizer step: ``grad_accum`` micro-batches, one normalisation (the module docstring's),
    gradients summed over ranks, clipped, then AdamW and the lr schedule. Nothing in it waits for the
    device: what it returns stays there."""
    cfg = run.cfg
    micro_batches: list[VarlenBatch] = [next(run.loader) for _ in range(cfg.grad_accum)]
    num_step_targets, num_step_tokens = step_counts(run, micro_batches)
    # FSDP averages gradients over ranks; our loss is already divided by the targets of ALL ranks.
    loss_scale = run.world_size if cfg.fsdp else 1
    step_loss_sum = torch.zeros((), dtype=sum_dtype(run.device), device=run.device)
    for i, batch in enumerate(micro_batches):
        if cfg.fsdp:  # reduce-scatter once per step, after the last micro-batch
            run.loss_fn.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss_sum = run.loss_fn(batch)
        # Each rank's sum over its targets / the step's targets on ALL ranks; summing the
        # gradients over ranks then gives the gradient of the global mean.
        (loss_sum * (loss_scale / at_least_one(num_step_targets))).backward()
        step_loss_sum += loss_sum.detach().to(step_loss_sum.dtype)
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
    return StepStats(
        loss_sum=all_reduce_sum(step_loss_sum),
        grad_norm=grad_norm.detach(),
        lr=lr,
        num_tokens=num_step_tokens,
        num_target_tokens=num_step_targets,
    )


def step_counts(run: Run, micro_batches: list[VarlenBatch]) -> tuple[int | torch.Tensor, int | torch.Tensor]:
    """``(target tokens, tokens)`` of the step over all ranks. The loader counted this rank's on the
    host; several ranks sum theirs in one all-reduce, whose result stays on the device (reading it
    would wait for the previous step's kernels)."""
    num_targets = int(sum(b.num_target_tokens for b in micro_batches))  # numpy ints from the loader
    num_tokens = int(sum(b.num_tokens for b in micro_batches))
    if run.world_size == 1:
        return num_targets, num_tokens
    # Built on the host and copied without waiting: a tensor made on the GPU from Python ints would sync.
    counts = torch.tensor([num_targets, num_tokens], dtype=sum_dtype(run.device))
    counts = all_reduce_sum(counts.to(run.device, non_blocking=True))
    return counts[0], counts[1]


def at_least_one(count: int | torch.Tensor) -> int | torch.Tensor:
    """``max(count, 1)``, on the device for a device count (``max`` would read it)."""
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


def log_step(run: Run, step: int, stats: StepStats) -> None:
    """Queue the step for its metrics.jsonl record; read the queue back every ``log_every`` steps and
    at the last, where a log line is printed."""
    run.pending.append(PendingStep(step=step, stats=stats, mem_bytes=memory_bytes(run.device)))
    if step % run.cfg.log_every == 0 or step == run.plan.num_steps:
        read_steps(run)


def read_steps(run: Run) -> None:
    """Bring the queued steps' figures to the host in one transfer (where the host waits for the
    device), then record each step in order on rank 0, with a log line where one is due.

    Tokens/s (and the MFU from it) is the window's: its tokens over the wall time since the last read,
    checkpoint or eval, which is exact once the device has caught up; each step's ETA is taken at its
    share of the window's tokens.
    """
    pending, run.pending = run.pending, []
    if not pending:
        return
    columns = [[p.stats.loss_sum for p in pending], [p.stats.grad_norm for p in pending]]
    if run.world_size > 1:  # the counts were summed on the device
        columns += [[p.stats.num_target_tokens for p in pending], [p.stats.num_tokens for p in pending]]
    dtype = sum_dtype(run.device)
    values = torch.stack([torch.stack(c).to(dtype) for c in columns]).tolist()  # the one transfer
    now = time.perf_counter()
    counts = (
        [(int(t), int(n)) for t, n in zip(values[2], values[3], strict=True)]
        if run.world_size > 1
        else [(p.stats.num_target_tokens, p.stats.num_tokens) for p in pending]
    )
    window_tokens = sum(n for _, n in counts)
    window_s = now - run.window_start
    tok_per_s = window_tokens / max(window_s, 1e-9)
    trained_s = run.pace.train_s if run.pace is not None else 0.0  # before this window
    done_tokens = 0
    for p, loss_sum, grad_norm, (num_targets, num_tokens) in zip(
        pending, values[0], values[1], counts, strict=True
    ):
        run.losses[p.step] = loss_sum / max(num_targets, 1)
        done_tokens += num_tokens
        # Each step's ETA from the training time up to it: its share of the window's tokens.
        train_s = trained_s + window_s * done_tokens / max(window_tokens, 1)
        if run.is_main:
            record_step(
                run,
                p,
                loss=run.losses[p.step],
                grad_norm=grad_norm,
                num_targets=num_targets,
                num_tokens=num_tokens,
                tok_per_s=tok_per_s,
                train_s=train_s,
            )
    if run.pace is not None:
        run.pace.train_s += window_s
    run.window_start = time.perf_counter()


def record_step(
    run: Run,
    p: PendingStep,
    *,
    loss: float,
    grad_norm: float,
    num_targets: int,
    num_tokens: int,
    tok_per_s: float,
    train_s: float,
) -> None:
    """The step's metrics.jsonl record, and its log line every ``log_every`` steps and at the last."""
    step, mem = p.step, p.mem_bytes
    eta_s = run.pace.eta_s(step, train_s=train_s) if run.pace is not None else 0.0
    step_mfu = run.info.mfu(tok_per_s) if run.info is not None else None
    run.record(
        {
            "step": step,
            "kind": "train",
            "loss": loss,
            "lr": p.stats.lr,
            "grad_norm": grad_norm,
            "tokens": num_tokens,
            "target_tokens": num_targets,
            "tok_per_s": tok_per_s,
            "mem_bytes": mem,
            "eta_s": eta_s,
            **({"mfu": step_mfu} if step_mfu is not None else {}),
        }
    )
    if step % run.cfg.log_every == 0 or step == run.plan.num_steps:
        run.say(
            step_line(
                step=step,
                num_steps=run.plan.num_steps,
                loss=loss,
                lr=p.stats.lr,
                num_targets=num_targets,
                tok_per_s=tok_per_s,
                mfu=step_mfu,
                mem_bytes=mem,
                eta_s=eta_s,
            )
        )


def save(run: Run, step: int) -> Path | None:
    """Checkpoint the run after ``step``; every rank takes part, rank 0 writes and gets the folder.
    The steps' records come first, so a checkpoint never exists without the records of its steps."""
    read_steps(run)
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
            tokenizer=dataset_tokenizer(run.cfg.data),
        )
    if run.is_main and run.cfg.keep_checkpoints:
        resumed_from = step_dir(run.cfg.out, run.start_step) if run.cfg.resume else None
        prune_checkpoints(run.cfg.out, run.cfg.keep_checkpoints, protect=resumed_from)
    if run.world_size > 1:
        dist.barrier()
    run.refresh_outputs()
    run.window_start = time.perf_counter()  # the next steps' tokens/s leaves the checkpoint out
    return path


def evaluate_run(run: Run, step: int) -> dict[str, EvalFigures]:
    """Packed loss and perplexity of every eval set after ``step`` (`train.eval.evaluate_split`), each
    recorded in metrics.jsonl with its set's name and logged, after the records of the steps before it."""
    read_steps(run)
    found = {}
    for name, split in run.eval_sets.items():
        figures = evaluate_split(
            run.model,
            split,
            batch_size=run.cfg.batch_size,
            device=run.device,
            loss_fn=run.loss_fn,
            lockstep=run.cfg.fsdp,
        )
        found[name] = figures
        run.record(
            {
                "step": step,
                "kind": "eval",
                "eval_set": name,
                "eval_loss": figures.loss,
                "eval_ppl": figures.ppl,
                "eval_target_tokens": figures.num_targets,
            }
        )
        run.say(
            f"eval step {step:,} | {name} | loss {figures.loss:.4f} | ppl {figures.ppl:,.3f}"
            f" | {split.num_rows:,} rows, {figures.num_targets:,} target tokens"
        )
    run.refresh_outputs()
    run.window_start = time.perf_counter()  # the next steps' tokens/s leaves the eval out
    return found


def record_eval(result: RunResult, step: int, found: dict[str, EvalFigures]) -> None:
    result.eval_set_losses[step] = {name: f.loss for name, f in found.items()}
    result.eval_losses[step] = next(iter(found.values())).loss


def finish(run: Run) -> Path | None:
    """Export the trained weights and plot the losses; the export's folder on rank 0."""
    # Under FSDP the exported weights are gathered from every rank first.
    export_state = full_model_state(run.model) if run.cfg.fsdp else None
    if not run.is_main:
        return None
    export = export_weights(
        run.model, run.cfg.out, state_dict=export_state, tokenizer=dataset_tokenizer(run.cfg.data)
    )
    plot_losses(run.cfg.out / METRICS, run.cfg.out / LOSS_PLOT)
    run.say(f"wrote {export}, {run.cfg.out / METRICS}, {run.cfg.out / LOSS_PLOT}")
    return export


# -- setup's parts ---------------------------------------------------------------------------------


def announce(run: Run, train_split: Split) -> None:
    """Work out what runs (`train.runinfo.RunInfo`) and say it: the run's first lines, and a warning
    when a GPU run is on the per-segment reference."""
    attn = choose_attn(run.cfg.attn, run.device)
    flops_per_token = train_flops_per_token(
        causal_lm(run.model), mean_context=mean_causal_context(train_split)
    )
    run.info = describe_run(
        cfg_model=run.cfg.model,
        model=run.model,
        attn=attn,
        plan=run.plan,
        device=run.device,
        requested_device=run.cfg.device,
        world_size=run.world_size,
        start_step=0,
        flops_per_token=flops_per_token,
        grad_checkpointing=run.cfg.grad_checkpointing,
        compiled=run.cfg.compile,
        device_reason=auto_device()[1] if run.cfg.device == "auto" else "asked for",
    )
    for line in header_lines(run.info, run.plan) + warning_lines(run.info):
        run.say(line)


def open_outputs(run: Run) -> None:
    """On rank 0, once the start step is known: run.json and the TensorBoard/W&B sinks."""
    cfg, info = run.cfg, dataclasses.replace(run.info, start_step=run.start_step)
    run.info = info
    write_run_json(cfg.out, info, resumed=cfg.resume)
    header = header_lines(info, run.plan)
    run.sinks = open_sinks(
        cfg.out,
        tensorboard=cfg.tensorboard,
        wandb=cfg.wandb,
        start_step=run.start_step,
        resumed=cfg.resume,
        header=header,
        config={**jsonable_config(cfg), "run": info.to_json()},
    )
    if run.sinks.names:
        run.say(f"{'logging to':<17}metrics.jsonl, {', '.join(run.sinks.names)}")
    for note in run.sinks.not_opened:
        run.say(f"warning: not logging to {note}")


def open_data(cfg: RunConfig) -> tuple[PackedDataset, Split, dict[str, Split | FirstRows]]:
    """The train split and the eval sets by name; shards are verified before training.

    --data's `val` split (if any) is the set `val`; each --eval-data set is its dataset's `val` split if
    it has one, else its `train` split, and replaces `val` when it takes that name. With --eval-max-tokens,
    each set's leading rows up to that many tokens.
    """
    dataset = PackedDataset(cfg.data, verify=cfg.verify)
    train_split = dataset.split("train")
    eval_sets = {"val": dataset.split("val")} if "val" in dataset.split_names else {}
    for name, path in cfg.eval_data:
        eval_set = PackedDataset(path, verify=cfg.verify)
        if eval_set.manifest.tokenizer.sha256 != dataset.manifest.tokenizer.sha256:
            raise DatasetError(
                f"--eval-data {name}=`{path}` was packed with another tokenizer"
                f" ({eval_set.manifest.tokenizer.path}) than --data ({dataset.manifest.tokenizer.path});"
                " pack both with the same tokenizer."
            )
        eval_sets[name] = eval_set.split("val" if "val" in eval_set.split_names else "train")
    if cfg.eval_max_tokens is not None:  # the leading rows, the same at every eval
        eval_sets = {
            name: FirstRows(split, rows_within(split, max_tokens=cfg.eval_max_tokens))
            for name, split in eval_sets.items()
        }
    return dataset, train_split, eval_sets


def build_model(cfg: RunConfig, vocab_size: int, device: torch.device) -> torch.nn.Module:
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora else None
    model = load_model(
        cfg.model,
        vocab_size=vocab_size,
        attn=cfg.attn,
        lora=lora,
        device=device,
        seed=cfg.seed,
        precision=cfg.dtype,
        grad_checkpointing=cfg.grad_checkpointing,
        compiled=cfg.compile,
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
    check_not_finished(path, state, run.cfg)
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
