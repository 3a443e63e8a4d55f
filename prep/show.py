"""Terminal views of a packed dataset: the `prep verify` report, and `prep inspect`'s summary and row view.

Everything renders with rich and stays readable at 100 columns. The row view shows, for one packed row,
each segment's decoded text with its boundaries, a compact token table (label and position of the tokens
around every boundary), and the row's block-diagonal causal attention mask, downsampled for long rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from prep.stats import SplitStats, dataset_stats, log2_histogram, mask_cells, summary
from prep.tokenizer import LoadedTokenizer, load_tokenizer
from prep.verify import VerifyReport
from shared.contract import IGNORE_INDEX
from shared.errors import UserError
from shared.manifest import Manifest
from shared.reader import PackedDataset, PackedRow

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")
MASK_CELLS = 40
"""Largest mask drawn in the terminal: 40 cells of two characters (terminal cells are twice as tall as wide),
so the picture is square and fits 100 columns with its margin."""
TEXT_CHARS = 400
"""Decoded characters shown per segment (head and tail of longer ones)."""
CONTEXT = 3
"""Tokens shown either side of each segment boundary in the token table."""


def print_verify_report(report: VerifyReport, console: Console) -> None:
    table = Table(
        title=f"verified {report.root}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for col in ("split", "shards", "rows", "tokens", "targets", "segments", "docs", "fragmented"):
        table.add_column(col, justify="right")
    for s in report.splits:
        table.add_row(
            s.name,
            str(s.num_shards),
            f"{s.num_rows:,}",
            f"{s.num_tokens:,}",
            f"{s.num_target_tokens:,}",
            f"{s.num_segments:,}",
            f"{s.num_docs:,}",
            f"{s.num_fragmented_docs:,}",
        )
    console.print(table)
    console.print(f"[green]all checks hold:[/] {', '.join(report.checks)}", highlight=False)
    if report.num_source_records:
        console.print(
            f"source records re-tokenized and compared: {report.num_source_records:,}", highlight=False
        )
    for why in report.skipped:
        console.print(f"[yellow]not checked:[/] {why}", highlight=False)
    for note in report.input_notes:
        console.print(f"[yellow]inputs:[/] {escape(note)}", highlight=False)
    console.print(
        f"{report.num_tokens:,} tokens, {report.num_bytes / 1e6:,.1f} MB in {report.seconds:.2f}s"
        f" ({report.tokens_per_second:,.0f} tok/s); row checks {report.row_seconds:.2f}s"
        f" ({report.num_tokens / max(report.row_seconds, 1e-9):,.0f} tok/s)",
        highlight=False,
    )


def mixture_table(m: Manifest) -> Table:
    """The mixture as asked and as packed, one row per source."""
    assert m.mixture is not None
    table = Table(title="mixture (share of train tokens)", title_justify="left")
    for col in ("source", "asked", "got", "docs in", "packed", "repeated", "left out", "train tokens"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for s in m.mixture.sources:
        asked = f"{s.share:.2%}" if s.share is not None else f"{s.epochs:g} epochs"
        table.add_row(
            escape(s.name),
            asked,
            f"{s.achieved_share:.2%}",
            f"{s.docs_in:,}",
            f"{s.docs_packed:,}",
            f"{s.docs_repeated:,}",
            f"{s.docs_left_out:,}",
            f"{s.train_tokens:,}",
        )
    return table


def summary_view(m: Manifest, stats: dict[str, SplitStats]) -> RenderableType:
    table = Table(title="dataset", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("split", "docs", "tokens", "rows", "fill", "segs/row", "max", "doc p50", "p90", "max len"):
        table.add_column(col, justify="right")
    for s in stats.values():
        seg, doc = summary(s.segs_per_row), summary(s.doc_len)
        table.add_row(
            s.name,
            f"{s.num_docs:,}",
            f"{s.num_tokens:,}",
            f"{s.num_rows:,}",
            f"{s.fill:.2%}",
            f"{seg['mean']:.2f}",
            f"{seg['max']:.0f}",
            f"{doc['p50']:,.0f}",
            f"{doc['p90']:,.0f}",
            f"{doc['max']:,.0f}",
        )
    d = m.documents
    accounting = Text(
        f"documents: {d.docs_in:,} read = {d.packed:,} packed + {d.dropped:,} dropped + {d.skipped:,} skipped;"
        f" {d.split:,} split, {d.truncated:,} truncated. seq_len {m.seq_len:,}, strategy {m.options.strategy}."
    )
    doc_len = np.concatenate([s.doc_len for s in stats.values()])
    return Group(table, accounting, Text("\ndocument length (tokens, all splits)"), histogram_text(doc_len))


def histogram_text(values: np.ndarray, width: int = 50) -> Text:
    bins = log2_histogram(values)
    while bins and bins[0][2] == 0:
        bins.pop(0)
    top = max((c for _, _, c in bins), default=1) or 1
    text = Text()
    for lo, hi, count in bins:
        bar = "#" * int(round(width * count / top))
        text.append(f"{lo:>7,}-{hi - 1:<7,} {count:>8,} ")
        text.append(bar + "\n", style="cyan")
    return text


def mask_text(cu_seqlens: np.ndarray, max_cells: int = MASK_CELLS) -> Text:
    """The row's attention mask: `#` query attends to key, `+` partly (downsampled), `.` masked."""
    frac, seg = mask_cells(cu_seqlens, max_cells)
    cells = len(frac)
    n = int(cu_seqlens[-1])
    text = Text()
    per_cell = n / cells
    text.append(
        f"attention mask: {n} x {n} tokens, {cells} x {cells} cells ({per_cell:.1f} tokens per cell);"
        " rows are queries, columns keys; # attends, + partly, . masked\n",
        style="dim",
    )
    for i in range(cells):
        text.append("  ")
        for j in range(cells):
            f = frac[i, j]
            ch = "#" if f >= 1.0 else ("+" if f > 0 else ".")
            style = COLOURS[int(seg[i]) % len(COLOURS)] if f > 0 else "dim"
            text.append(ch + " ", style=style)
        text.append("\n")
    return text


def _piece(tok: LoadedTokenizer | None, token_id: int) -> str:
    if tok is None:
        return ""
    s = repr(tok.decode([token_id]))[1:-1]
    return s if len(s) <= 18 else s[:17] + "~"


def _window(cu: np.ndarray, n: int, max_all: int = 40) -> list[int | None]:
    """Token indices to tabulate: all of a short row, else tokens around each boundary (None = gap).

    Rows with many segments show one token either side (the EOS and the ignored first token), others more.
    """
    if n <= max_all:
        return list(range(n))
    context = CONTEXT if len(cu) <= 5 else 1
    keep = np.zeros(n, dtype=bool)
    for b in cu.tolist():
        keep[max(0, b - context) : min(n, b + context)] = True
    shown: list[int | None] = []
    for i in np.flatnonzero(keep).tolist():
        if shown and shown[-1] is not None and i != shown[-1] + 1:
            shown.append(None)
        shown.append(i)
    return shown


def token_table(row: PackedRow, tok: LoadedTokenizer | None, eos_id: int) -> Table:
    cu = row.cu_seqlens.astype(np.int64)
    seg_of = np.searchsorted(cu, np.arange(row.num_tokens), side="right") - 1
    table = Table(title="tokens around each boundary", title_justify="left", padding=(0, 1))
    for col, just in (("#", "right"), ("seg", "right"), ("pos", "right"), ("id", "right"), ("token", "left")):
        table.add_column(col, justify=just)
    table.add_column("label", justify="right")
    for i in _window(cu, row.num_tokens):
        if i is None:
            table.add_row("...", "", "", "", "", "")
            continue
        s = int(seg_of[i])
        label = int(row.labels[i])
        style = COLOURS[s % len(COLOURS)]
        shown_label = "-100 (ignored)" if label == IGNORE_INDEX else str(label)
        ident = f"{row.input_ids[i]}" + (" EOS" if row.input_ids[i] == eos_id else "")
        table.add_row(
            str(i),
            str(s),
            str(row.position_ids[i]),
            ident,
            _piece(tok, int(row.input_ids[i])),
            shown_label,
            style=style,
        )
    return table


def segments_view(row: PackedRow, tok: LoadedTokenizer | None, eos_id: int) -> Text:
    text = Text()
    cu = row.cu_seqlens.tolist()
    # Many short segments: less text each, so the boundaries stay on screen.
    chars = TEXT_CHARS if row.num_segments <= 4 else TEXT_CHARS // 3
    for s, doc in enumerate(row.doc_ids.tolist()):
        a, b = cu[s], cu[s + 1]
        ids = row.input_ids[a:b]
        ends = "ends the document (EOS)" if ids[-1] == eos_id else "document continues in another row"
        header = f"--- segment {s}: doc_id {doc}, tokens {a}..{b - 1} ({b - a}), {ends} ---"
        text.append(header + "\n", style=f"bold {COLOURS[s % len(COLOURS)]}")
        body = tok.decode(ids) if tok is not None else " ".join(map(str, ids.tolist()))
        if len(body) > chars:
            half = chars // 2
            body = f"{body[:half]} [... {len(body) - chars:,} characters ...] {body[-half:]}"
        text.append(body + "\n")
    return text


TRAINED, MASKED, SPECIAL = "bold green", "dim", "bold magenta"


def targets_view(row: PackedRow, tok: LoadedTokenizer | None, eos_id: int, plain: bool) -> Text:
    """Each segment of a row of conversations, its trained tokens coloured apart from the masked ones and
    every special token (a turn boundary, the EOS) marked. ``plain`` (no terminal, no colour): trained
    text between `«` and `»`, special tokens between `⟦` and `⟧`."""
    specials = set(tok.special_ids().tolist()) if tok is not None else {eos_id}
    text = Text()
    cu = row.cu_seqlens.tolist()
    legend = "legend: «trained» masked ⟦special⟧ «⟦trained special⟧»" if plain else None
    text.append((legend or "legend: ") + ("\n" if legend else ""), style="dim")
    if not legend:
        text.append("trained", style=TRAINED)
        text.append(" masked", style=MASKED)
        text.append(" special (turn boundary, EOS)", style=SPECIAL)
        text.append(" trained special\n", style=f"{TRAINED} underline")
    for s, doc in enumerate(row.doc_ids.tolist()):
        a, b = cu[s], cu[s + 1]
        targets = int((row.labels[a:b] != IGNORE_INDEX).sum())
        header = f"--- segment {s}: doc_id {doc}, tokens {a}..{b - 1} ({b - a}), {targets} trained ---"
        text.append(header + "\n", style=f"bold {COLOURS[s % len(COLOURS)]}")
        for kind, ids in _runs(row, a, b, specials):
            piece = tok.decode(ids) if tok is not None else " ".join(map(str, ids))
            if kind == "trained special":
                text.append(f"«⟦{piece}⟧»" if plain else piece, style=f"{TRAINED} underline")
            elif kind == "special":
                text.append(f"⟦{piece}⟧" if plain else piece, style=SPECIAL)
            elif kind == "trained":
                text.append(f"«{piece}»" if plain else piece, style=TRAINED)
            else:
                text.append(piece, style=MASKED)
        text.append("\n")
    return text


def _runs(row: PackedRow, a: int, b: int, specials: set[int]) -> list[tuple[str, list[int]]]:
    """Tokens ``a:b`` of a row as runs of one kind: ``special`` (one token each), ``trained`` or ``masked``."""
    runs: list[tuple[str, list[int]]] = []
    for i in range(a, b):
        token = int(row.input_ids[i])
        trained = int(row.labels[i]) != IGNORE_INDEX
        kind = "special" if token in specials else "trained" if trained else "masked"
        if kind == "special" and trained:  # a trained closing token: marked as both
            kind = "trained special"
        if runs and runs[-1][0] == kind and "special" not in kind:
            runs[-1][1].append(token)
        else:
            runs.append((kind, [token]))
    return runs


@dataclass(frozen=True, kw_only=True, slots=True)
class InspectConfig:
    root: Path
    row: int | None = None
    split: str = "train"
    tokenizer: str | None = None
    """Default: the manifest's tokenizer path, if it still exists (else token ids are shown)."""
    png: Path | None = None


def _tokenizer(cfg: InspectConfig, m: Manifest) -> tuple[LoadedTokenizer | None, str]:
    path = cfg.tokenizer or m.tokenizer.path
    if cfg.tokenizer is None and not Path(path).exists():
        return None, f"tokenizer `{path}` is gone; showing ids (pass --tokenizer to decode)"
    tok = load_tokenizer(path, eos_token=m.tokenizer.eos_token, bos_token=m.tokenizer.bos_token)
    note = "" if tok.info.sha256 == m.tokenizer.sha256 else f"warning: `{path}` is not the packing tokenizer"
    return tok, note


def inspect_dataset(cfg: InspectConfig, console: Console) -> None:
    """Print the dataset summary and, with ``cfg.row``, that row; write the pictures to ``cfg.png``."""
    ds = PackedDataset(cfg.root)
    m = ds.manifest
    if cfg.row is not None:
        num_rows = ds.split(cfg.split).num_rows
        if not 0 <= cfg.row < num_rows:
            has = f"rows 0..{num_rows - 1}" if num_rows else "no rows"
            raise UserError(f"--row {cfg.row} is out of range: split `{cfg.split}` has {has}.")
    stats = dataset_stats(ds)
    console.print(summary_view(m, stats))
    if m.mixture is not None:
        console.print(mixture_table(m))
    row = None
    if cfg.row is not None:
        split = ds.split(cfg.split)
        tok, note = _tokenizer(cfg, m)
        if note:
            console.print(f"[yellow]{note}[/]", highlight=False)
        shard, local = split.locate(cfg.row)
        row = split.row(cfg.row)
        console.print(
            f"\n[bold]row {cfg.row} of `{cfg.split}`[/] (shard `{shard.path.name}`, row {local}):"
            f" {row.num_tokens:,} of {m.seq_len:,} tokens, {row.num_segments} segment(s),"
            f" cu_seqlens {row.cu_seqlens.tolist()[:16]}{' ...' if row.num_segments > 15 else ''}",
            highlight=False,
        )
        if m.options.masked_labels:
            plain = not console.is_terminal or console.no_color
            console.print(targets_view(row, tok, m.tokenizer.eos_id, plain))
        else:
            console.print(segments_view(row, tok, m.tokenizer.eos_id))
        console.print(token_table(row, tok, m.tokenizer.eos_id))
        console.print(mask_text(row.cu_seqlens))
    if cfg.png is not None:
        from prep.plots import inspect_figure

        inspect_figure(stats, row, cfg.row, cfg.png)
        console.print(f"wrote {cfg.png}", highlight=False)
