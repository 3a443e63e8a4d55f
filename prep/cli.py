"""The `prep` command line: a thin Typer layer that builds configs, calls one library function per command,
and turns library errors into red text and exit codes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from prep import pipeline
from prep.recipe import Mixture, load_recipe, mixture_from_options
from prep.show import mixture_table
from shared.cli import console, fail, out, typer_app
from shared.errors import UserError
from shared.manifest import Manifest

app = typer_app("prep", "Turn documents into packed, verified Arrow shards for varlen causal-LM training.")


class RichProgress(pipeline.Progress):
    """Draws the pipeline's phases as one rich progress bar each."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None
        self.fields = {"docs": 0, "tokens": 0}

    def start(self, phase: str, total: float | None) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total or 0)
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task(phase, total=total, **self.fields)

    def advance(self, amount: float, **fields: int) -> None:
        self.fields.update(fields)
        self.progress.update(self.task, advance=amount, **self.fields)

    def message(self, text: str) -> None:
        # As text: brackets in a path (`data[1].jsonl`) are not rich markup, and long paths are not broken.
        self.progress.console.print(escape(text), highlight=False, soft_wrap=True)


class PlainProgress(pipeline.Progress):
    """Progress as plain lines, one every :attr:`interval` seconds, for a log file, `nohup` or CI.

    A progress bar redrawn in place is noise in a file; a line a few seconds apart says how far a run got,
    how fast it goes and when it should end, and survives in the log of a job that died.
    """

    interval = 5.0

    def __init__(self, console: Console) -> None:
        self.console = console
        self.phase, self.total, self.done = "", None, 0.0
        self.fields = {"docs": 0, "tokens": 0}
        self.started = self.last = time.monotonic()

    def start(self, phase: str, total: float | None) -> None:
        if self.phase:
            self._line(final=True)
        self.phase, self.total, self.done = phase, total, 0.0
        self.started = self.last = time.monotonic()

    def advance(self, amount: float, **fields: int) -> None:
        self.done += amount
        self.fields.update(fields)
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def message(self, text: str) -> None:
        self.console.print(escape(text), highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self.phase:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        bytes_phase = self.phase == "tokenize"
        unit = (lambda v: f"{v / 2**20:,.1f} MiB") if bytes_phase else (lambda v: f"{v:,.0f} rows")
        parts = []
        if self.total:
            parts.append(f"{self.done / self.total:.1%} ({unit(self.done)} of {unit(self.total)})")
        elif self.done:
            parts.append(unit(self.done))
        parts.append(f"{self.fields['docs']:,} docs, {self.fields['tokens']:,} tokens")
        rate = self.done / elapsed
        if self.done:
            parts.append(f"{unit(rate)}/s")
        if final:
            parts.append(f"done in {elapsed:.1f} s")
        elif self.total and rate > 0:
            parts.append(f"ETA {max(self.total - self.done, 0) / rate:.0f} s")
        self.console.print(f"{self.phase}: " + ", ".join(parts), highlight=False, soft_wrap=True)


CHAT_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|eom_id|>")
"""End-of-turn tokens of chat templates: as the separator of plain documents, each document reads as a turn."""


LEFT_OUT_NOTE = 0.5
"""Share of a source's tokens left out above which the summary says why (a downsampled source, not a bug)."""


def left_out_notes(m: Manifest) -> list[str]:
    """A line for each source the mixture left most of out, saying what set the total; none otherwise."""
    assert m.mixture is not None
    x, notes = m.mixture, []
    for s in x.sources:
        if s.tokens_in and s.tokens_left_out > LEFT_OUT_NOTE * s.tokens_in:
            why = (
                f"the total_tokens asked ({x.total_tokens:,})"
                if x.total_tokens is not None
                else f"the most tokens every share allows within max_epochs {x.max_epochs:g} (the source with"
                " the fewest tokens for its share sets it); raise max_epochs to keep more"
            )
            notes.append(
                f"note: source `{s.name}` is sampled down: {s.docs_left_out:,} of its {s.docs_in:,} documents"
                f" ({s.tokens_left_out / s.tokens_in:.0%} of its tokens) are left out, to meet its share of {why}."
            )
    return notes


def print_summary(m: Manifest, folder: Path, seconds: float) -> None:
    d = m.documents
    target = log_console()
    table = Table(title=f"packed into {folder}", title_justify="left")
    for col in ("split", "docs", "rows", "lower bound", "tokens", "fill", "shards"):
        table.add_column(col, justify="right")
    for name, s in m.splits.items():
        lower = -(-s.num_tokens // m.seq_len)
        fill = s.num_tokens / max(1, s.num_rows * m.seq_len)
        table.add_row(
            name,
            f"{s.num_docs:,}",
            f"{s.num_rows:,}",
            f"{lower:,}",
            f"{s.num_tokens:,}",
            f"{fill:.2%}",
            str(len(s.shards)),
        )
    target.print(table)
    if m.mixture is not None:
        target.print(mixture_table(m))
        for line in left_out_notes(m):
            target.print(line, highlight=False, markup=False, soft_wrap=True)
    t = m.tokenizer
    bos = f"BOS {t.bos_token} (id {t.bos_id})" if t.bos_token is not None else "no BOS"
    target.print(f"separator: EOS {t.eos_token} (id {t.eos_id}); {bos}", highlight=False, markup=False)
    if t.eos_token in CHAT_TURN_TOKENS:
        console.print(
            f"[bold yellow]warning:[/] the EOS `{escape(t.eos_token)}` is a chat template's end-of-turn token"
            " (a chat model's tokenizer folder names it as its EOS): every document now ends as a chat turn"
            " does. For plain documents pass the tokenizer's document separator, e.g. `--eos-token"
            " '<|endoftext|>'`, and pack again with `--overwrite`.",
            highlight=False,
            soft_wrap=True,
        )
    target.print(
        f"documents: {d.docs_in:,} in = {d.packed:,} packed + {d.dropped:,} dropped + {d.skipped:,} skipped"
        f" (empty {d.skipped_empty:,}, missing field {d.skipped_missing_field:,}, invalid {d.skipped_invalid:,});"
        f" {d.split:,} split, {d.truncated:,} truncated",
        highlight=False,
    )
    stored = sum(s.num_tokens for s in m.splits.values())  # a mixture's repeats included
    if m.options.masked_labels:
        targets = sum(s.num_target_tokens for s in m.splits.values())
        tokens = sum(s.num_tokens for s in m.splits.values())
        target.print(
            f"records: {m.options.format}; targets {targets:,} of {tokens:,} tokens ({targets / max(tokens, 1):.2%}),"
            f" trained roles {m.options.train_on or '(completions)'}; --long-chats {m.options.long_chats}:"
            f" {d.dropped:,} dropped, {d.truncated:,} truncated",
            highlight=False,
            markup=False,
        )
    target.print(
        f"{stored:,} tokens in {seconds:.1f}s ({stored / max(seconds, 1e-9):,.0f} tok/s)", highlight=False
    )


def log_console() -> Console:
    """Standard output, not cut to a terminal's width when it goes to a file: a log keeps every column."""
    return out if out.is_terminal else Console(file=out.file, width=1000, soft_wrap=True)


def run_pack(cfg: pipeline.PackConfig) -> Manifest:
    start = time.perf_counter()
    columns = (
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[docs]:>10,} docs {task.fields[tokens]:>14,} tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    if console.is_terminal:
        with Progress(*columns, console=console, transient=False) as bar:
            manifest = pipeline.pack(cfg, RichProgress(bar))
    else:
        plain = PlainProgress(console)
        manifest = pipeline.pack(cfg, plain)
        plain.finish()
    print_summary(manifest, cfg.out, time.perf_counter() - start)
    return manifest


@app.command()
def pack(
    tokenizer: Annotated[str, typer.Option(help="A tokenizer.json, or a model folder that holds one.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Output folder for shards, manifest.json and README.md.")
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="JSONL/JSON, CSV/TSV, Parquet or text files (also .gz .bz2 .xz .zst), folders, globs, datasets"
            " saved with save_to_disk, `-` (JSON lines on stdin), hf:ORG/NAME (a Hugging Face dataset by"
            " name, via datasets) or fsspec URLs (s3://, gs://, hf://, file://); none with --recipe or --source."
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Maximum tokens per packed row.")] = 1024,
    strategy: Annotated[
        str,
        typer.Option(help="bfd (best-fit-decreasing, near-perfect fill) or wrapped (concatenate and cut)."),
    ] = "bfd",
    text_field: Annotated[
        str,
        typer.Option(
            help="Field holding the document text: a JSON key, a dotted path into nested JSON (content.body), or a CSV/TSV column."
        ),
    ] = "text",
    dataset_split: Annotated[
        str | None,
        typer.Option(help="Split to read of each saved DatasetDict input; needed when one has several."),
    ] = None,
    eos_token: Annotated[
        str | None, typer.Option(help="Document separator; default the tokenizer's EOS.")
    ] = None,
    bos_token: Annotated[
        str | None, typer.Option(help="Token placed before every document; default none.")
    ] = None,
    long_docs: Annotated[
        str, typer.Option(help="Documents longer than --seq-len: split, truncate or drop.")
    ] = "split",
    val_fraction: Annotated[
        float, typer.Option(help="Share of documents for the `val` split, chosen by content hash.")
    ] = 0.0,
    workers: Annotated[
        int | None,
        typer.Option(help="Tokenizing processes (threads with PREP_ENCODER=tokenizers); default every core."),
    ] = None,
    rows_per_shard: Annotated[
        int | None, typer.Option(help="Rows per shard file; default about 256 MB per shard.")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Count and skip malformed records instead of stopping.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already in --out.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted pack in --out (same options and inputs).")
    ] = False,
    executor: Annotated[
        str,
        typer.Option(
            help="local (every core of this machine) or ray (a Ray cluster; needs the `ray` extra). Same output."
        ),
    ] = "local",
    engine: Annotated[
        str | None, typer.Option(hidden=True, help="The earlier name of --executor, kept for scripts.")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join with --executor ray, e.g. head:6379; default RAY_ADDRESS, else a"
            " local Ray. --out and the inputs must be on storage every node sees."
        ),
    ] = None,
    license: Annotated[
        str | None,
        typer.Option(
            help="The data's license for the card, an SPDX-style id (apache-2.0, cc-by-4.0) or other."
        ),
    ] = None,
    language: Annotated[
        list[str] | None,
        typer.Option(
            help="A language of the documents for the card, ISO 639-1/3 (en, yue); repeat for several."
        ),
    ] = None,
    source_dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="A dataset the documents come from, for the card's source_datasets; repeat for several."
        ),
    ] = None,
    description: Annotated[
        str | None, typer.Option(help="What the data is, in words: the card's description section.")
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(help="A mixture recipe (TOML): sources with shares or epochs. See docs/mixtures.md."),
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            help="A mixture source inline (repeat): NAME=INPUT[,INPUT...]:share=X (or :epochs=X),"
            " optionally :text_field=F."
        ),
    ] = None,
    max_epochs: Annotated[
        float | None, typer.Option(help="With --source: most times any source is packed (default 1).")
    ] = None,
    total_tokens: Annotated[
        int | None,
        typer.Option(help="With --source: train tokens to mix to; default the most --max-epochs allows."),
    ] = None,
    mix_seed: Annotated[
        int | None, typer.Option(help="With --source: seed of the hashed document sample (default 0).")
    ] = None,
    record_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="What records hold: auto (each file's first record tells), text, chat (a `messages` list,"
            " rendered with the chat template) or prompt-completion (`prompt`/`completion` pairs).",
        ),
    ] = "auto",
    chat_template: Annotated[
        str | None,
        typer.Option(help="Jinja chat template file; default the tokenizer folder's own."),
    ] = None,
    train_on: Annotated[
        list[str] | None,
        typer.Option(
            help="Role whose turns are targets in conversations (repeat for several); default assistant."
        ),
    ] = None,
    long_chats: Annotated[
        str,
        typer.Option(
            help="Conversations longer than --seq-len: drop, or truncate after the last whole trained turn."
        ),
    ] = "drop",
) -> None:
    """Tokenize documents, separate them with EOS, pack them into rows and write Arrow shards.

    Example: prep pack data/*.jsonl --tokenizer Qwen2.5-0.5B/ --out packed/ --seq-len 4096 --val-fraction 0.01

    A mixture, 70% calls and 30% news, news at most twice (or the same as a TOML --recipe):

    prep pack --source 'calls=data/calls/*.jsonl:share=0.7' --source 'news=data/news/*.jsonl.gz:share=0.3' \\
    --max-epochs 2 --tokenizer Qwen2.5-0.5B/ --out mixed/

    Conversations (`messages` lists), trained on the assistant's turns only (docs/chat.md):

    prep pack chats.jsonl --format chat --tokenizer Qwen2.5-0.5B-Instruct/ --out chat-packed/
    """
    try:
        mixture = build_mixture(inputs, recipe, source, max_epochs, total_tokens, mix_seed)
        cfg = pipeline.PackConfig(
            inputs=tuple(inputs or ()) if mixture is None else mixture.inputs,
            mixture=mixture,
            tokenizer=tokenizer,
            out=out_dir,
            seq_len=seq_len,
            strategy=strategy,
            text_field=text_field,
            dataset_split=dataset_split,
            eos_token=eos_token,
            bos_token=bos_token,
            long_docs=long_docs,
            val_fraction=val_fraction,
            workers=workers,
            rows_per_shard=rows_per_shard,
            skip_invalid=skip_invalid,
            overwrite=overwrite,
            resume=resume,
            executor=engine if engine is not None else executor,
            ray_address=ray_address,
            license=license,
            language=tuple(language or ()),
            source_datasets=tuple(source_dataset or ()),
            description=description,
            format=record_format,
            chat_template=chat_template,
            train_on=tuple(train_on or ("assistant",)),
            long_chats=long_chats,
        )
        run_pack(cfg)
    except UserError as e:
        raise fail(e) from None


def build_mixture(
    inputs: list[str] | None,
    recipe: Path | None,
    sources: list[str] | None,
    max_epochs: float | None,
    total_tokens: int | None,
    seed: int | None,
) -> Mixture | None:
    """The mixture of `--recipe` or `--source`, or None for a plain pack; a mix of the ways is refused."""
    flags = {"--max-epochs": max_epochs, "--total-tokens": total_tokens, "--mix-seed": seed}
    given = [name for name, value in flags.items() if value is not None]
    if recipe is None and not sources:
        if given:
            raise UserError(f"{given[0]} belongs to a mixture; add --source options, or drop it.")
        return None
    if inputs:
        raise UserError(
            f"inputs {' '.join(inputs)!r} given beside a mixture; with --recipe or --source every input"
            " belongs to a source: move them into one."
        )
    if recipe is not None and sources:
        raise UserError("pass either --recipe or --source, not both; put every source in the recipe.")
    if recipe is not None:
        if given:
            key = given[0].removeprefix("--").replace("-", "_").replace("mix_seed", "seed")
            raise UserError(
                f"{given[0]} is not taken beside --recipe: set `{key}` in the recipe (docs/mixtures.md)."
            )
        return load_recipe(recipe)
    return mixture_from_options(sources or [], seed=seed, max_epochs=max_epochs, total_tokens=total_tokens)


@app.command()
def demo(
    folder: Annotated[
        Path, typer.Argument(help="Where to write the sample corpus, tokenizer and packed dataset.")
    ] = Path("demo"),
    seq_len: Annotated[int, typer.Option(help="Maximum tokens per packed row.")] = 1024,
) -> None:
    """Generate the bundled sample corpus and tokenizer (offline), pack them into FOLDER/packed, and verify
    every row against the contract and the re-tokenized sources.

    Example: prep demo demo/
    """
    from prep.sample import write_sample
    from prep.show import print_verify_report
    from prep.verify import VerifyConfig, verify_dataset

    packed = folder / "packed"
    try:
        corpus, tok_dir = write_sample(folder)
        out.print(f"wrote sample corpus {corpus} and tokenizer {tok_dir}", highlight=False)
        run_pack(
            pipeline.PackConfig(
                inputs=(str(corpus),),
                tokenizer=str(tok_dir),
                out=packed,
                seq_len=seq_len,
                val_fraction=0.05,
                overwrite=True,
            )
        )
        report = verify_dataset(
            VerifyConfig(root=packed, tokenizer=str(tok_dir), sources=(str(corpus),), inputs=True)
        )
    except UserError as e:
        raise fail(e) from None
    print_verify_report(report, log_console())
    out.print(
        f"next: prep inspect {packed} --row 0    |    train run --data {packed} --model tiny-qwen2"
        f" --out {folder / 'run'} --max-steps 30 --batch-size 2 --lr 1e-2",
        highlight=False,
    )


@app.command()
def verify(
    folder: Annotated[Path, typer.Argument(help="A dataset folder written by `prep pack`.")],
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer to check the fingerprint of; default the manifest's, if it still exists."
        ),
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            help="The inputs given to `prep pack`, in order (repeat): re-tokenize a sample and compare."
        ),
    ] = None,
    sample: Annotated[int, typer.Option(help="Source records to re-tokenize with --source.")] = 256,
    inputs: Annotated[
        bool,
        typer.Option(
            "--inputs",
            help="Hash the inputs again (at the paths the manifest records) and compare their size and"
            " sha256 with the manifest's: fails if they changed since packing.",
        ),
    ] = False,
) -> None:
    """Check every row of every shard against the manifest and the shard contract; exit 1 at the first failure.

    Example: prep verify packed/ --tokenizer Qwen2.5-0.5B/ --source data/a.jsonl --source data/b.jsonl --inputs
    """
    from prep.verify import VerifyConfig, verify_dataset

    try:
        cfg = VerifyConfig(
            root=folder, tokenizer=tokenizer, sources=tuple(source or ()), sample=sample, inputs=inputs
        )
        report = verify_dataset(cfg)
    except UserError as e:
        raise fail(e) from None
    from prep.show import print_verify_report

    print_verify_report(report, log_console())


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="A dataset folder written by `prep pack`.")],
    row: Annotated[
        int | None, typer.Option(help="Show this row: segments, tokens and attention mask.")
    ] = None,
    split: Annotated[str, typer.Option(help="Split that --row indexes.")] = "train",
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer to decode with; default the manifest's, if it still exists.")
    ] = None,
    png: Annotated[
        Path | None, typer.Option(help="Also write the mask and length histograms to this PNG file.")
    ] = None,
) -> None:
    """Summarise a packed dataset (documents, tokens, fill, lengths) and show one row in readable form.

    Example: prep inspect packed/ --row 0 --png row0.png
    """
    from prep.show import InspectConfig, inspect_dataset

    try:
        inspect_dataset(
            InspectConfig(root=folder, row=row, split=split, tokenizer=tokenizer, png=png), log_console()
        )
    except UserError as e:
        raise fail(e) from None


@app.command()
def card(folder: Annotated[Path, typer.Argument(help="A dataset folder written by `prep pack`.")]) -> None:
    """Rebuild the data card FOLDER/README.md (and its plot) from the manifest and the shards.

    Example: prep card packed/
    """
    from prep.card import write_card

    try:
        path = write_card(folder)
    except UserError as e:
        raise fail(e) from None
    out.print(f"wrote {path}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
