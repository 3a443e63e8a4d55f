"""`prep inspect --png` pictures (matplotlib, Agg backend): a row's attention mask and length histograms.

Files are byte-for-byte deterministic for a given matplotlib version (no timestamp, no software tag). The
data card's picture, which every `prep pack` draws, does without matplotlib: see :mod:`prep.card_plot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from prep.stats import SplitStats, mask_cells  # noqa: E402
from shared.reader import PackedRow  # noqa: E402

MASK_PIXELS = 512
MAX_BOUNDARY_LINES = 16
_HISTTYPE = "stepfilled"
"""One polygon per histogram instead of one rectangle per bar: the same picture at a fraction of the drawing."""
_SEGMENT_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b")


def _save(fig: plt.Figure, path: Path | BinaryIO) -> Path | BinaryIO:
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def _log_bins(values: np.ndarray) -> np.ndarray:
    if len(values) == 0:
        return np.array([1, 2])
    low, top = max(1, int(values.min())), int(values.max()) + 1
    return np.unique(np.geomspace(low, max(top, low + 1), 40).astype(np.int64))


def _doc_length_axes(ax: plt.Axes, stats: dict[str, SplitStats]) -> None:
    for s in stats.values():
        if len(s.doc_len):
            ax.hist(
                s.doc_len,
                bins=_log_bins(s.doc_len),
                histtype=_HISTTYPE,
                alpha=0.6,
                label=f"{s.name} ({s.num_docs:,})",
            )
    seq_len = next(iter(stats.values())).seq_len if stats else 0
    if seq_len:
        ax.axvline(seq_len, color="black", linestyle="--", linewidth=1, label=f"seq_len {seq_len:,}")
    ax.set_xscale("log")
    ax.set_xlabel("tokens per document (EOS included)")
    ax.set_ylabel("documents")
    ax.set_title("document length")
    ax.legend(fontsize=8)


def _segments_axes(ax: plt.Axes, stats: dict[str, SplitStats]) -> None:
    top = max((int(s.segs_per_row.max()) for s in stats.values() if s.num_rows), default=1)
    bins = np.arange(0.5, top + 1.5)
    for s in stats.values():
        ax.hist(s.segs_per_row, bins=bins, histtype=_HISTTYPE, alpha=0.6, label=s.name)
    ax.set_xlabel("segments per row")
    ax.set_ylabel("rows")
    ax.set_title("segments per row")
    ax.legend(fontsize=8)


def _mask_axes(ax: plt.Axes, row: PackedRow, row_index: int | None) -> None:
    frac, seg = mask_cells(row.cu_seqlens, MASK_PIXELS)
    n = row.num_tokens
    # Colour each allowed cell by its query's segment; masked cells stay white.
    image = np.where(frac > 0, (seg[:, None] % len(_SEGMENT_COLOURS)) + 1, 0)
    cmap = ListedColormap(["#ffffff", *_SEGMENT_COLOURS])
    ax.imshow(
        image, cmap=cmap, vmin=0, vmax=len(_SEGMENT_COLOURS), interpolation="nearest", extent=(0, n, n, 0)
    )
    if row.num_segments <= MAX_BOUNDARY_LINES:  # more lines would hide the blocks they mark
        for b in row.cu_seqlens[1:-1].tolist():
            ax.axhline(b, color="grey", linewidth=0.5)
            ax.axvline(b, color="grey", linewidth=0.5)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    ax.set_title(f"row {row_index}: causal mask of {row.num_segments} segments, {n:,} tokens", fontsize=10)


def inspect_figure(
    stats: dict[str, SplitStats], row: PackedRow | None, row_index: int | None, path: Path | BinaryIO
) -> Path | BinaryIO:
    """The row's mask (when a row is given) beside the document-length and segments-per-row histograms."""
    panels = 3 if row is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 5))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.11, top=0.92, wspace=0.28)
    if row is not None:
        _mask_axes(axes[0], row, row_index)
    _doc_length_axes(axes[-2], stats)
    _segments_axes(axes[-1], stats)
    return _save(fig, path)
