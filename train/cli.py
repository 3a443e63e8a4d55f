"""The `train` command line: a thin Typer layer that builds configs, calls one library function per command,
and turns library errors into red text and exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shared.cli import console as err
from shared.cli import fail, out, typer_app
from shared.errors import UserError

if TYPE_CHECKING:
    from train.check import CheckResult
    from train.compare import EvalReport

app = typer_app("train", "Plan, run, check and export LoRA training on packed varlen shards.")


@app.command()
def plan(
    token_budget: Annotated[
        int | None,
        typer.Option(help="Tokens of capacity to train on (steps = floor(budget / tokens per step))."),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (instead of --token-budget).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Packed rows per micro-batch.")] = 8,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per packed row; default the --data manifest's, else 1024.")
    ] = None,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    world_size: Annotated[int, typer.Option(help="Data-parallel ranks (GPUs).")] = 1,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps with linear lr warmup.")] = 0.05,
    data: Annotated[
        Path | None,
        typer.Option(help="Packed dataset: adds epochs and rows left out (reads the manifest only)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model folder (only config.json is read) or tiny-qwen2: adds a peak memory estimate."
        ),
    ] = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(help="With --model: say whether the step fits this much GPU memory, e.g. 24GiB."),
    ] = None,
    lora: Annotated[
        bool, typer.Option("--lora/--no-lora", help="LoRA or every weight (with --model).")
    ] = True,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (with --model).")] = 32,
    dtype: Annotated[str, typer.Option(help="Compute dtype of the estimate: bf16 or fp32.")] = "bf16",
    grad_checkpointing: Annotated[
        bool,
        typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Estimate with checkpointing."),
    ] = False,
) -> None:
    """Print what a run will do before it runs: tokens per step, steps, warmup, tokens used, epochs;
    with --model, its peak GPU memory, and with --gpu-memory whether it fits (and what would).

    Example: train plan --token-budget 100000000 --batch-size 8 --seq-len 1024 --model Qwen2.5-0.5B/ --gpu-memory 24GiB
    """
    from shared.manifest import Manifest
    from train.plan import DataShape, describe, make_plan

    try:
        shape = None
        if data is not None:
            manifest = Manifest.load(data)
            if seq_len is not None and seq_len != manifest.seq_len:
                raise UserError(
                    f"--seq-len {seq_len} disagrees with `{data}`, packed at seq_len {manifest.seq_len};"
                    " drop --seq-len (a run uses the dataset's)."
                )
            seq_len = manifest.seq_len
            if "train" not in manifest.splits:
                raise UserError(f"`{data}` has no `train` split; pack it again.")
            s = manifest.splits["train"]
            shape = DataShape(
                num_rows=s.num_rows, num_tokens=s.num_tokens, num_target_tokens=s.num_target_tokens
            )
        result = make_plan(
            batch_size=batch_size,
            seq_len=1024 if seq_len is None else seq_len,  # make_plan refuses 0 rather than replace it
            grad_accum=grad_accum,
            world_size=world_size,
            token_budget=token_budget,
            max_steps=max_steps,
            warmup_ratio=warmup_ratio,
            data=shape,
        )
        lines = describe(result)
        if model is not None:
            vocab = None if data is None else Manifest.load(data).tokenizer.vocab_size
            lines += memory_lines(
                model, result, vocab, gpu_memory, lora_r if lora else None, dtype, grad_checkpointing
            )
        elif gpu_memory is not None:
            raise UserError("--gpu-memory needs --model (the estimate is of a model); add --model.")
    except UserError as e:
        raise fail(e) from None
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


def memory_lines(spec, plan, vocab_size, gpu_memory, lora_r, dtype, grad_checkpointing) -> list[str]:
    """`train plan --model`'s lines: the estimate by part, and whether it fits --gpu-memory."""
    from train.memory import (
        describe_fit,
        describe_memory,
        estimate_memory,
        find_fit,
        model_shape,
        parse_memory,
    )

    if dtype not in ("bf16", "fp32"):
        raise UserError(f"--dtype {dtype!r}: the estimate is for bf16 or fp32.")
    shape = model_shape(spec, vocab_size=vocab_size)
    tokens = plan.batch_size * plan.seq_len
    kw = {"lora_r": lora_r, "precision": dtype, "grad_checkpointing": grad_checkpointing}
    lines = describe_memory(shape, estimate_memory(shape, tokens=tokens, **kw), **kw)
    if gpu_memory is not None:
        gpu_bytes = parse_memory(gpu_memory)
        size = {"batch_size": plan.batch_size, "grad_accum": plan.grad_accum}
        fit = find_fit(shape, gpu_bytes=gpu_bytes, seq_len=plan.seq_len, **size, **kw)
        lines += describe_fit(fit, gpu_bytes, **size)
    return lines


@app.command()
def run(
    data: Annotated[Path | None, typer.Option(help="Packed dataset folder (`prep pack --out`).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Hugging Face model folder, or `tiny-qwen2` (random, for tests).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder: metrics, loss.png, checkpoints, adapter.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file with any of these options; flags override it.")
    ] = None,
    token_budget: Annotated[int | None, typer.Option(help="Run length in tokens of capacity.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Run length in optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Packed rows per micro-batch (default 8).")] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Micro-batches per optimizer step (default 1).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 2e-4).")] = None,
    min_lr_ratio: Annotated[
        float | None, typer.Option(help="Final lr as a share of --lr (default 0.1).")
    ] = None,
    warmup_ratio: Annotated[
        float | None, typer.Option(help="Share of steps warming up (default 0.05).")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default 0).")] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help="Max global grad norm; 0 = off (default 1.0).")
    ] = None,
    eval_data: Annotated[
        list[str] | None,
        typer.Option(
            help="Eval set NAME=PATH (repeatable): a packed dataset's val split (else train), besides"
            " --data's val split, named `val`."
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(help="Evaluate at step 0, every N steps and at the end; 0 = off (default 100)."),
    ] = None,
    eval_max_tokens: Annotated[
        int | None,
        typer.Option(help="Evaluate each set's leading rows up to this many tokens (default every row)."),
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps; 0 = at the end (default 0).")
    ] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")
    ] = None,
    attn: Annotated[
        str | None, typer.Option(help="auto, flash_attn, torch_varlen or sdpa (default auto).")
    ] = None,
    lora: Annotated[
        bool | None,
        typer.Option("--lora/--no-lora", help="Train a LoRA adapter, or every weight (default lora)."),
    ] = None,
    fsdp: Annotated[
        bool | None,
        typer.Option(
            "--fsdp/--no-fsdp",
            help="Under torchrun: shard the model over ranks (FSDP2); needs --no-lora (default off).",
        ),
    ] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default 32).")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha (default 64).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Data order, LoRA init, built-in model weights (default 0).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu, cuda, cuda:N or mps (default auto: cuda, else mps, else cpu)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="auto, bf16 or fp32 (default auto: bf16 on a GPU that has it, else fp32)."),
    ] = None,
    grad_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--grad-checkpointing/--no-grad-checkpointing",
            help="Recompute each layer in the backward: less memory, same gradients (default off).",
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile each decoder layer (inductor): faster steps after a slow first one"
            " (default off).",
        ),
    ] = None,
    init_adapter: Annotated[
        Path | None,
        typer.Option(
            help="Start from this LoRA adapter (adapter folder, run or checkpoint); optimizer fresh."
        ),
    ] = None,
    keep_checkpoints: Annotated[
        int | None, typer.Option(help="Keep the newest N checkpoints; 0 keeps all (default 0).")
    ] = None,
    verify: Annotated[
        str | None, typer.Option(help="Shard check before training: checksum or size (default checksum).")
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="Print a log line every N steps (default 1).")] = None,
    tensorboard: Annotated[
        bool | None,
        typer.Option(
            "--tensorboard/--no-tensorboard",
            help="Log to TensorBoard in OUT/tensorboard (default: on when the package is installed).",
        ),
    ] = None,
    wandb: Annotated[
        bool | None,
        typer.Option(
            "--wandb/--no-wandb", help="Log to Weights & Biases (WANDB_MODE=offline works; default off)."
        ),
    ] = None,
    sample_prompt: Annotated[
        list[str] | None,
        typer.Option(help="A prompt to continue greedily after each eval, logged (repeatable)."),
    ] = None,
    sample_tokens: Annotated[
        int | None, typer.Option(help="Most new tokens per --sample-prompt (default 32).")
    ] = None,
) -> None:
    """Train on a packed dataset: AdamW, warmup + cosine, grad accumulation, checkpoints, resume.

    Example: train run --data packed/ --model Qwen2.5-0.5B/ --out runs/r1 --token-budget 20000000 --batch-size 8
    """
    # Every parameter but --config, by RunConfig field name; None means "not given on the command line".
    flags = dict(locals())
    flags["out"] = flags.pop("out_dir")
    flags.pop("config")
    from train.config import build_run_config
    from train.loop import train
    from train.model import quiet_progress_bars
    from train.parallel import init_distributed_from_env

    try:
        cfg = build_run_config(config, flags)
        joined = init_distributed_from_env(cfg.device)
        try:
            with quiet_progress_bars():
                train(cfg, log=lambda line: out.print(line, highlight=False, soft_wrap=True))
        finally:
            if joined:
                import torch.distributed as dist

                dist.destroy_process_group()
    except UserError as e:
        raise fail(e) from None


@app.command("eval")
def eval_command(
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="Eval set NAME=PATH (repeatable): a packed dataset; its val split, else train."
            " Default: the run's own eval sets (its --data's val split and its --eval-data)."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model: a Hugging Face folder (an exported one too) or `tiny-qwen2`, as PATH or NAME=PATH"
            " (NAME labels its row; default `base` under --adapter/--run, else the folder's name)."
            " Default the runs' model."
        ),
    ] = None,
    adapter: Annotated[
        list[Path] | None,
        typer.Option(help="A run's adapter/ or a checkpoint folder, put on the base (repeatable)."),
    ] = None,
    run: Annotated[
        list[Path] | None, typer.Option("--run", help="A run folder: every checkpoint of it (repeatable).")
    ] = None,
    base: Annotated[bool, typer.Option("--base/--no-base", help="Evaluate the base model too.")] = True,
    split: Annotated[
        str | None, typer.Option(help="Split of every eval set (default val where there is one, else train).")
    ] = None,
    max_rows: Annotated[int | None, typer.Option(help="Evaluate the first N rows of each set.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Evaluate leading rows up to this many tokens of each set.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Packed rows per forward.")] = 8,
    doc_level: Annotated[
        bool,
        typer.Option(
            "--doc-level",
            help="Score whole documents (fragments rejoined) in rolling windows, not packed rows.",
        ),
    ] = False,
    window: Annotated[
        int | None, typer.Option(help="--doc-level: tokens per window (default the dataset's seq_len).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option(help="--doc-level: tokens between window starts (default window / 2).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write every figure to this JSON file.")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer.json for bits per byte (default the manifest's path).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    attn: Annotated[str, typer.Option(help="auto, flash_attn, torch_varlen or sdpa.")] = "auto",
    seed: Annotated[
        int | None, typer.Option(help="Weights of a `tiny-qwen2` base (default the run's).")
    ] = None,
) -> None:
    """Loss, perplexity and bits per byte of a base model and what was trained on it, per eval set.

    Rows: the base, each --adapter, each checkpoint of each --run. Packed (default): the rows as
    training reads them; a long document's fragments are scored without their earlier context.
    --doc-level rejoins each document and scores it in windows that carry context (docs/training.md).

    Example: train eval --run runs/r1 --data fin=packed/fin --data news=packed/news --json eval.json

    Example: train eval --run runs/r1   (the run's own eval sets, every checkpoint)
    """
    from train.compare import EvalConfig, run_eval
    from train.config import named_model, named_paths
    from train.model import quiet_progress_bars

    try:
        model_name, model = named_model(model)
        cfg = EvalConfig(
            data=named_paths(data or [], "--data"),
            model=model,
            model_name=model_name,
            adapters=tuple(adapter or ()),
            runs=tuple(run or ()),
            base=base,
            split=split,
            max_rows=max_rows,
            max_tokens=max_tokens,
            batch_size=batch_size,
            doc_level=doc_level,
            window=window,
            stride=stride,
            tokenizer=tokenizer,
            device=device,
            attn=attn,
            seed=seed,
        )
        with quiet_progress_bars():
            report = run_eval(cfg, log=lambda line: err.print(line, highlight=False, soft_wrap=True))
        if json_out is not None:
            report.write_json(json_out)
    except UserError as e:
        raise fail(e) from None
    print_eval(report)
    for note in report.notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if json_out is not None:
        out.print(f"wrote {json_out}", highlight=False, soft_wrap=True)


def print_eval(report: EvalReport) -> None:
    """A table per eval set: a row per model (the base first) with loss, perplexity and its change
    against the base (when there is a base and another row), bits per byte and the target tokens scored."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    base_row = report.base_row
    # The change in perplexity against the base, when there is a base and something to compare with it.
    versus = None
    if base_row is not None and len(report.rows) > 1:
        versus = "vs base" if base_row.name == "base" else f"vs {base_row.name}"
    for s in report.sets:
        if report.cfg.doc_level:
            how = f"{len(s.documents):,} documents, window {s.window}, stride {s.stride}"
        else:
            how = f"{s.rows.num_rows:,} of {s.split.num_rows:,} packed rows"
        table = Table()
        table.add_column("model", no_wrap=True)  # a checkpoint's name, whole
        for name in ("loss", "ppl", versus, "bits/byte", "target tokens"):
            if name is not None:
                table.add_column(name, justify="right")
        for row in report.rows:
            f = report.results[row.name][s.name]
            cells = [row.name, f"{f.loss:.4f}", f"{f.ppl:,.3f}"]
            if versus is not None:
                base_ppl = report.results[base_row.name][s.name].ppl
                cells.append("" if row.is_base else f"{f.ppl / base_ppl - 1:+.1%}")
            bpb = "n/a" if f.bits_per_byte is None else f"{f.bits_per_byte:.4f}"
            table.add_row(*cells, bpb, f"{f.num_targets:,}")
        # As wide as the rows need, also when piped (80 columns): a wrapped model name cannot be pasted.
        # (Console.print clamps its width to the console's, so a wider table needs a console of its own.)
        width = Measurement.get(out, out.options.update_width(10_000), table).maximum
        console = out if width <= out.width else Console(width=width, file=out.file, color_system=None)
        # The title as a line of its own: a table's title is padded with spaces to the table's width.
        out.print(f"{s.name}: {s.path} ({s.split.name} split, {how})", highlight=False, soft_wrap=True)
        console.print(table)


@app.command()
def check(
    data: Annotated[Path, typer.Argument(help="Packed dataset folder (`prep pack --out`).")],
    model: Annotated[str, typer.Option(help="Hugging Face model folder, or `tiny-qwen2`.")] = "tiny-qwen2",
    attn: Annotated[str, typer.Option(help="auto, flash_attn, torch_varlen or sdpa.")] = "auto",
    split: Annotated[str, typer.Option(help="Split to sample rows from.")] = "train",
    num_rows: Annotated[int, typer.Option(help="Rows with two or more segments to check.")] = 4,
    seed: Annotated[int, typer.Option(help="Chooses the rows (and a built-in model's weights).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    negative_control: Annotated[
        bool, typer.Option(help="Run the packed row with a plain causal mask (leaks); the check must fail.")
    ] = False,
    tolerance: Annotated[
        float | None, typer.Option(help="Relative tolerance (default by dtype: fp32 1e-4, bf16 3e-2).")
    ] = None,
) -> None:
    """Prove that packed documents cannot see each other (packed row vs each segment alone).

    Runs sampled rows through the trainer's varlen path, runs each of their segments alone, and
    compares the logits; fails (exit 1) when the max difference exceeds a dtype-dependent tolerance.
    --negative-control runs the packed row with a plain causal mask instead: the check must FAIL.

    Example: train check data/packed --model tiny-qwen2
    """
    from train.check import CheckConfig, run_check
    from train.model import quiet_progress_bars

    try:
        cfg = CheckConfig(
            data=Path(data),
            model=model,
            attn=attn,
            split=split,
            num_rows=num_rows,
            seed=seed,
            device=device,
            negative_control=negative_control,
            tolerance=tolerance,
        )
        with quiet_progress_bars():
            result = run_check(cfg)
    except UserError as e:
        raise fail(e) from None
    print_check(result)
    if not result.rows:
        err.print(
            f"[bold red]FAIL:[/] none of the {result.num_rows_scanned} rows scanned holds two or more segments,"
            " so isolation was not exercised. Pack with a larger --seq-len, or check another split.",
            highlight=False,
        )
        raise typer.Exit(1)
    if not result.passed:
        worst = max(result.rows, key=lambda r: r.max_abs_diff / r.tolerance)
        note = (
            " As expected: this is the negative control, and the check caught its leak."
            if cfg.negative_control
            else " Documents see each other: do not train with this setup."
        )
        err.print(
            f"[bold red]FAIL:[/] row {worst.row}: max |logit difference| {worst.max_abs_diff:.3g} exceeds"
            f" the tolerance {worst.tolerance:.3g} ({result.dtype}).{note}",
            highlight=False,
        )
        raise typer.Exit(1)
    out.print(
        f"[green]PASS:[/] {len(result.rows)} rows, max |logit difference| {result.max_abs_diff:.3g}"
        f" <= tolerance ({result.relative_tolerance:g} x max(1, |logit|), {result.dtype}).",
        highlight=False,
    )


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder (`train run --out`).")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder to write (created; replaced with --overwrite).")
    ],
    checkpoint: Annotated[
        int | None, typer.Option(help="Step of the checkpoint to export (default the newest).")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge the LoRA adapter into the base: a complete model folder.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    base: Annotated[
        str | None, typer.Option(help="Base model folder, if the run's --model is not found from here.")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder to ship (default: the one the run's data names).")
    ] = None,
) -> None:
    """Write a run's weights as a Hugging Face folder with the tokenizer: merged model or adapter.

    --merge: AutoModelForCausalLM.from_pretrained(OUT) loads it; without: PeftModel.from_pretrained(base, OUT),
    the base named by its absolute path.

    Example: train export runs/r1 --merge --out r1-merged/
    """
    from train.export import ExportConfig, export_run
    from train.model import quiet_progress_bars

    try:
        cfg = ExportConfig(
            run=run_dir,
            out=out_dir,
            checkpoint=checkpoint,
            merge=merge,
            overwrite=overwrite,
            base=base,
            tokenizer=tokenizer,
        )
        with quiet_progress_bars():
            result = export_run(cfg)
    except UserError as e:
        raise fail(e) from None
    if result.kind == "adapter":
        load = f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({result.base!r}), {str(result.out)!r})"
    else:
        load = f"AutoModelForCausalLM.from_pretrained({str(result.out)!r})"
    for line in (
        f"exported the {result.kind} of {result.checkpoint} to {result.out}",
        f"  base       {result.base}",
        f"  tokenizer  {result.tokenizer}",
        f"  files      {', '.join(result.files)}",
        f"load it with {load}",
    ):
        out.print(line, highlight=False, soft_wrap=True)


def print_check(result: CheckResult) -> None:
    """A table line per checked row, and how many rows were passed over for holding one segment."""
    from rich.table import Table

    table = Table(title=f"isolation check ({result.mode}, attn={result.attn}, {result.dtype})")
    for name in ("row", "tokens", "segments", "max |dlogit|", "tolerance", "result"):
        table.add_column(name, justify="right")
    for r in result.rows:
        verdict = "[green]ok[/]" if r.passed else "[bold red]LEAK[/]"
        table.add_row(
            str(r.row),
            str(r.num_tokens),
            str(r.num_segments),
            f"{r.max_abs_diff:.3g}",
            f"{r.tolerance:.3g}",
            verdict,
        )
    out.print(table)
    out.print(
        f"scanned {result.num_rows_scanned} rows; {result.num_single_segment_rows} held a single segment"
        " and were passed over (nothing to leak)",
        highlight=False,
    )


TRAIN_EXTRA_MODULES = frozenset({"torch", "transformers", "peft", "safetensors", "psutil", "tomli"})
"""What the `train` extra installs (pyproject.toml): `prep` users install without it."""


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as e:
        # Commands import torch lazily, so a missing extra surfaces here; anything else is a real bug.
        missing = (e.name or "").partition(".")[0]
        if missing not in TRAIN_EXTRA_MODULES:
            raise
        message = (
            f"`{missing}` is not installed: `train` needs the train extra;"
            " run `pip install 'packed-shards[train]'` (install torch first to choose its build)."
        )
        raise SystemExit(fail(UserError(message)).exit_code) from None


if __name__ == "__main__":
    main()
