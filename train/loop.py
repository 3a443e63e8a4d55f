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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from shared.errors import DatasetError, UserError
from shared.fileio import atomic_write_text
from shared.reader import PackedDataset, Split
from train.batch import VarlenBatch
from train.checkpoint import (
    latest_checkpoint,
    read_checkpoint_state,
    restore_checkpoint,
    save_checkpoint,
    unwrap,
)
from train.config import RunConfig
from train.loader import Loader, batch_from_rows, sequential_batches
from train.loss import micro_batch_loss_sum
from train.model import LoraSettings, input_embeddings, load_model, resolve_device
from train.parallel import (  # noqa: F401  (init_distributed_from_env: `train.cli` imports it here)
    all_reduce_grads,
    all_reduce_sum,
    dist_info,
    full_model_state,
    full_state,
    init_distributed_from_env,
    shard_fsdp,
)
from train.plan import DataShape, RunPlan, describe, lr_factor, make_plan
from train.resume import check_resume, jsonable_config

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass(slots=True)
class RunResult:
    plan: RunPlan
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step taken in this call (1-based step numbers)."""
    eval_losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    export: Path | None = None
    """The final adapter (peft ``save_pretrained``) or model folder."""


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


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> RunResult:
    """Run ``cfg`` to its last step (or from its newest checkpoint with ``cfg.resume``)."""
    rank, world_size = dist_info()
    is_main = rank == 0
    say = log if is_main else (lambda _: None)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    if is_main:
        make_out_folder(cfg.out)
    dataset, train_split, eval_split = open_data(cfg)
    manifest = dataset.manifest
    info = manifest.splits["train"]
    plan = make_plan(
        batch_size=cfg.batch_size,
        seq_len=manifest.seq_len,
        grad_accum=cfg.grad_accum,
        world_size=world_size,
        token_budget=cfg.token_budget,
        max_steps=cfg.max_steps,
        warmup_ratio=cfg.warmup_ratio,
        data=DataShape(
            num_rows=info.num_rows, num_tokens=info.num_tokens, num_target_tokens=info.num_target_tokens
        ),
    )
    for line in describe(plan):
        say(line)

    model = build_model(cfg, manifest.tokenizer.vocab_size, device)
    if cfg.fsdp and world_size == 1:
        raise UserError(
            "--fsdp shards the model over ranks, but this is a single process; start it with torchrun"
            " --nproc-per-node N (N > 1), or drop --fsdp."
        )
    # The loss goes through the FSDP root's forward (its hooks gather the shards), or straight to model.
    loss_fn = shard_fsdp(model, device) if cfg.fsdp else partial(micro_batch_loss_sum, model)
    # FSDP averages gradients over ranks; our loss is already divided by the targets of ALL ranks.
    loss_scale = world_size if cfg.fsdp else 1
    params = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)
    say(
        f"model {cfg.model}: {num_trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    # Dropout (if the model has any) draws from the global generator: seed it per rank.
    torch.manual_seed(cfg.seed + rank)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    schedule = partial(
        lr_factor,
        num_steps=plan.num_steps,
        num_warmup_steps=plan.num_warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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

    # The checkpoint's loader position means something only for the same rows in the same shards.
    data_fingerprint = hashlib.sha256("".join(sh.sha256 for sh in info.shards).encode()).hexdigest()
    start_step = 0
    resumes: list[dict] = []  # every resume of this run so far: its step and the options it changed
    if cfg.resume:
        path = latest_checkpoint(cfg.out)
        state = read_checkpoint_state(path)
        changed = check_resume(
            path,
            state,
            cfg,
            num_steps=plan.num_steps,
            num_warmup_steps=plan.num_warmup_steps,
            rows_per_step=loader.rows_per_step,
            world_size=world_size,
            data_fingerprint=data_fingerprint,
        )
        restore_checkpoint(path, state, model=model, optimizer=optimizer, scheduler=scheduler)
        loader.load_state_dict(state["loader"])
        start_step = state["step"]
        resumes = [
            *state.get("resumes", []),
            {"step": start_step, "checkpoint": path.name, "changed": changed},
        ]
        say(f"resumed from {path} at step {start_step:,}")
        for name, (before, now) in changed.items():
            say(f"  {name}: {before} -> {now} from step {start_step + 1:,} on")
    result = RunResult(plan=plan)
    if is_main:
        metrics = open_metrics(cfg.out / METRICS, keep_through=start_step)
        if cfg.resume:  # the record says where the run restarted, and what it ran differently from there
            metrics.write(
                json.dumps(
                    {"step": start_step, "resumed_from": resumes[-1]["checkpoint"], "changed": changed}
                )
                + "\n"
            )
            metrics.flush()

    def checkpoint(step: int) -> None:
        # Full fine-tuning saves by parameter name (resumable on any number of ranks, FSDP or not);
        # under FSDP every rank takes part in gathering the shards.
        full = None if cfg.lora else full_state(model, optimizer)
        if is_main:
            result.last_checkpoint = save_checkpoint(
                cfg.out,
                step=step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                loader_state=loader.state_dict(),
                extra={
                    "num_steps": plan.num_steps,
                    "num_warmup_steps": plan.num_warmup_steps,
                    "data_fingerprint": data_fingerprint,
                    "config": jsonable_config(cfg),
                    "resumes": resumes,
                    "world_size": world_size,
                },
                full=full,
            )
        if world_size > 1:
            dist.barrier()

    try:
        for step in range(start_step + 1, plan.num_steps + 1):
            t_start = time.perf_counter()
            # ---- one optimizer step: grad_accum micro-batches, one normalisation --------------------
            micro_batches: list[VarlenBatch] = [next(loader) for _ in range(cfg.grad_accum)]
            counts = torch.tensor(
                [sum(b.num_target_tokens for b in micro_batches), sum(b.num_tokens for b in micro_batches)],
                dtype=torch.float64,
                device=device,
            )
            num_step_targets, num_step_tokens = (int(v) for v in all_reduce_sum(counts).tolist())
            step_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, batch in enumerate(micro_batches):
                if cfg.fsdp:  # reduce-scatter once per step, after the last micro-batch
                    loss_fn.set_requires_gradient_sync(i == len(micro_batches) - 1)
                loss_sum = loss_fn(batch)
                # Each rank's sum over its targets / the step's targets on ALL ranks; summing the
                # gradients over ranks then gives the gradient of the global mean.
                (loss_sum * (loss_scale / max(num_step_targets, 1))).backward()
                step_loss_sum += loss_sum.detach().double()
            if not cfg.fsdp:
                all_reduce_grads(params)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # ---- bookkeeping: loss, throughput, logs ------------------------------------------------
            loss = float(all_reduce_sum(step_loss_sum)) / max(num_step_targets, 1)
            result.losses[step] = loss
            # Wall time of this step alone (eval and checkpoint writes below are not counted).
            tok_per_s = num_step_tokens / max(time.perf_counter() - t_start, 1e-9)
            if is_main:
                mem = memory_bytes(device)
                metrics.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "tokens": num_step_tokens,
                            "target_tokens": num_step_targets,
                            "tok_per_s": tok_per_s,
                            "mem_bytes": mem,
                        }
                    )
                    + "\n"
                )
                metrics.flush()
                if step % cfg.log_every == 0 or step == plan.num_steps:
                    say(
                        f"step {step:>6,}/{plan.num_steps:,} | loss {loss:.4f} | lr {lr:.2e}"
                        f" | tok/s {tok_per_s:>9,.0f} | mem {mem / 2**30:.2f} GiB"
                    )
            is_last = step == plan.num_steps
            # Save before evaluating: a slow or failing eval never costs the steps since the last save.
            if is_last or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint(step)
            if eval_split is not None and cfg.eval_every and (step % cfg.eval_every == 0 or is_last):
                eval_loss = evaluate(
                    model,
                    eval_split,
                    batch_size=cfg.batch_size,
                    device=device,
                    loss_fn=loss_fn,
                    lockstep=cfg.fsdp,
                )
                result.eval_losses[step] = eval_loss
                if is_main:
                    metrics.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                    metrics.flush()
                    say(
                        f"eval step {step:,} | loss {eval_loss:.4f} ({eval_split.name}, {eval_split.num_rows:,} rows)"
                    )
    finally:
        loader.close()
        if is_main:
            metrics.close()

    # Under FSDP the exported weights are gathered from every rank first.
    export_state = full_model_state(model) if cfg.fsdp else None
    if is_main:
        result.export = export_weights(model, cfg.out, state_dict=export_state)
        plot_losses(cfg.out / METRICS, cfg.out / LOSS_PLOT)
        say(f"wrote {result.export}, {cfg.out / METRICS}, {cfg.out / LOSS_PLOT}")
    return result


def make_out_folder(out: Path) -> None:
    """Create ``out`` before any work, so that an --out that cannot hold the run fails at once."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out `{out}` is a file; pass a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--out `{out}` cannot be created ({e.strerror or e}); pass a folder in a writable place."
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out `{out}` is not writable; pass a folder in a writable place.")


def open_metrics(path: Path, *, keep_through: int):
    """Open metrics.jsonl for appending, first dropping records after step ``keep_through`` (those of
    a run killed after its last checkpoint: the resumed run writes them again)."""
    if path.exists():
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line and json.loads(line)["step"] <= keep_through
        ]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return open(path, "a", encoding="utf-8")


def memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def export_weights(model: torch.nn.Module, out: Path, state_dict: dict | None = None) -> Path:
    """The trained adapter via peft ``save_pretrained`` (or the whole model) under ``out``;
    ``state_dict`` holds the unsharded weights of an FSDP model."""
    model = unwrap(model)
    target = out / ("adapter" if hasattr(model, "peft_config") else "model")
    model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)
    return target


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_pts = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train_pts, "train", "-"), (eval_pts, "eval", "o-")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean CE per target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
