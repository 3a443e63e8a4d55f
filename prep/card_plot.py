"""The data card's picture: document length, segments per row and row fill histograms, drawn without matplotlib.

Three panels side by side, one bar per bin and one colour per split (train blue, val orange, their
overlap brown), with ticks, a legend and captions in a built-in bitmap font (:mod:`prep.png`). It avoids
matplotlib's import and drawing on every `prep pack`, and it is a pure function of the statistics, so the
same dataset gives the same bytes. ``prep inspect --png`` still draws with matplotlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from prep.png import GLYPH_H, Canvas, text_width
from prep.stats import SplitStats
from shared.manifest import MixtureInfo

WIDTH, HEIGHT, PANEL_WIDTH = 1500, 420, 500
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 56, 70
"""Margins of each panel's plot area, in pixels."""
WHITE, BLACK, GRID = 0, 1, 2
SPLIT_COLOUR = {1: 3, 2: 4, 3: 5}
"""Palette index of a bar pixel by which splits cover it (bit 0: first split, bit 1: second)."""
PALETTE = [
    (255, 255, 255),
    (0, 0, 0),
    (225, 225, 225),
    (121, 173, 210),  # tab:blue at 60% over white, as the matplotlib card drew it
    (255, 178, 110),  # tab:orange at 60% over white
    (201, 145, 92),  # orange at 60% over the blue: where both splits have documents
]
NUM_LOG_BINS = 40
LEGEND_SWATCH, LEGEND_LINE = 24, 20
"""Legend: pixels from a swatch to its text, and between lines."""


@dataclass(frozen=True, slots=True)
class _Scale:
    """Data range ``[lo, hi]`` of one axis, linear or logarithmic, mapped to ``[0, 1]``."""

    lo: float
    hi: float
    log: bool = False

    def frac(self, values: np.ndarray | float) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        if self.log:
            return (np.log(v) - math.log(self.lo)) / (math.log(self.hi) - math.log(self.lo))
        return (v - self.lo) / (self.hi - self.lo)

    def ticks(self) -> list[float]:
        if self.log:
            first, last = math.ceil(math.log10(self.lo)), math.floor(math.log10(self.hi))
            steps = (1,) if last - first >= 2 else (1, 2, 5)
            ticks = [m * 10.0**k for k in range(first - 1, last + 1) for m in steps]
            return [t for t in ticks if self.lo <= t <= self.hi]
        raw = (self.hi - self.lo) / 5
        mag = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        return [k * step for k in range(math.ceil(self.lo / step), math.floor(self.hi / step) + 1)]


@dataclass(frozen=True, slots=True)
class _Panel:
    title: str
    xlabel: str
    ylabel: str
    x: _Scale
    y: _Scale
    edges: np.ndarray
    """Bin edges shared by every split."""
    counts: list[np.ndarray]
    """Per split: count in each bin."""
    labels: list[str]
    """Per split: its legend text."""
    x_format: str = "count"
    """How tick values read: ``count`` (1.5K) or ``percent`` (25%)."""
    marker: tuple[float, str] | None = None
    """A dashed vertical line at a value, with its legend text."""
    legend: str = "right"
    """The top corner the legend prefers (the other is tried next)."""


def _compact(value: float) -> str:
    """1.5K, 20K, 3M: tick labels short enough for the margin."""
    for size, suffix in ((1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _cover(panel: _Panel, y: _Scale, width: int, height: int) -> np.ndarray:
    """The plot area's bar pixels: one bit per split, so that pixels both cover get the overlap colour."""
    cover = np.zeros((height, width), dtype=np.uint8)
    xs = np.round(panel.x.frac(panel.edges) * width).astype(np.int64)
    for k, counts in enumerate(panel.counts):
        for i in np.flatnonzero(counts):
            a, b = xs[i], max(xs[i + 1], xs[i] + 1)
            h = round(float(np.clip(y.frac(counts[i]), 0, 1)) * height)
            cover[height - max(h, 1) :, max(a, 0) : min(b, width)] |= 1 << k
    return cover


def _place_legend(panel: _Panel, entries: list, width: int, height: int) -> tuple[_Scale, np.ndarray, int]:
    """(y scale, bar pixels, legend's left x in the plot): a top corner free of bars, as matplotlib's
    "best" does; where both corners hold bars, the y axis grows until the bars pass under the legend."""
    box_w = LEGEND_SWATCH + max(text_width(label, 2) for _, label in entries) + 8
    box_h = LEGEND_LINE * len(entries) + 8
    corners = (width - 4 - box_w, 4) if panel.legend == "right" else (4, width - 4 - box_w)
    y = panel.y
    cover = _cover(panel, y, width, height)
    marker = -1 if panel.marker is None else round(float(panel.x.frac(panel.marker[0])) * width)
    free = [x for x in corners if not cover[: box_h + 4, max(x, 0) : x + box_w].any()]
    for x in free:
        if not x - 4 <= marker < x + box_w + 4:
            return y, cover, x
    if free:
        return y, cover, free[0]  # the legend's white box hides a stretch of the dashed line
    grow = height / max(1, height - box_h - 8)
    y = (
        _Scale(y.lo, y.lo * (y.hi / y.lo) ** grow, log=True)
        if y.log
        else _Scale(y.lo, y.lo + (y.hi - y.lo) * grow)
    )
    return y, _cover(panel, y, width, height), corners[0]


def _draw(canvas: Canvas, x0: int, panel: _Panel) -> None:
    left, right = x0 + LEFT, x0 + PANEL_WIDTH - RIGHT
    top, bottom = TOP, HEIGHT - BOTTOM
    width, height = right - left, bottom - top
    entries = [(SPLIT_COLOUR[1 << k], label) for k, label in enumerate(panel.labels)]
    if panel.marker is not None:
        entries.append((None, panel.marker[1]))
    y_scale, cover, legend_x = _place_legend(panel, entries, width, height)
    canvas.text(x0 + PANEL_WIDTH // 2 + LEFT // 2, 8, panel.title, BLACK, anchor="centre")
    canvas.text(left, top - GLYPH_H * 2 - 10, panel.ylabel, BLACK)
    for t in y_scale.ticks():
        y = bottom - round(float(y_scale.frac(t)) * height)
        canvas.hline(left, right, y, GRID)
        canvas.text(left - 8, y - GLYPH_H, _compact(t), BLACK, anchor="right")
    region = canvas.pixels[top:bottom, left:right]
    for bits, colour in SPLIT_COLOUR.items():
        region[cover == bits] = colour
    for t in panel.x.ticks():
        x = left + round(float(panel.x.frac(t)) * width)
        canvas.vline(x, bottom, bottom + 6, BLACK)
        label = f"{t:.0%}" if panel.x_format == "percent" else _compact(t)
        canvas.text(x, bottom + 10, label, BLACK, anchor="centre")
    canvas.hline(left, right + 1, bottom, BLACK)
    canvas.vline(left, top, bottom + 1, BLACK)
    canvas.text(left + width // 2, bottom + 36, panel.xlabel, BLACK, anchor="centre")
    if panel.marker is not None:
        canvas.vline(left + round(float(panel.x.frac(panel.marker[0])) * width), top, bottom, BLACK, dash=6)
    _legend(canvas, entries, left + legend_x, top + 8)


def _legend(canvas: Canvas, entries: list, x: int, y: int) -> None:
    """Legend lines from ``(x, y)`` on a white box: a colour swatch (or a dashed line), then the text."""
    box_w = LEGEND_SWATCH + max(text_width(label, 2) for _, label in entries)
    canvas.box(x - 4, y - 4, x + box_w + 4, y + LEGEND_LINE * len(entries), WHITE)
    for colour, label in entries:
        if colour is None:
            canvas.vline(x + 8, y, y + 14, BLACK, dash=3)
        else:
            canvas.box(x, y, x + 16, y + 14, colour)
        canvas.text(x + LEGEND_SWATCH, y, label, BLACK)
        y += LEGEND_LINE


def _log_edges(values: np.ndarray) -> np.ndarray:
    low, top = max(1, int(values.min())), int(values.max()) + 1
    return np.unique(np.geomspace(low, max(top, low + 1), NUM_LOG_BINS).astype(np.int64))


def _counts(stats: list[SplitStats], attr: str, edges: np.ndarray, scale=None) -> list[np.ndarray]:
    return [np.histogram(getattr(s, attr) * (scale(s) if scale else 1), bins=edges)[0] for s in stats]


def _linear_y(counts: list[np.ndarray]) -> _Scale:
    return _Scale(0.0, 1.08 * max((int(c.max(initial=0)) for c in counts), default=0) or 1.0)


def _doc_length_panel(stats: list[SplitStats]) -> _Panel:
    seq_len = stats[0].seq_len
    lengths = np.concatenate([s.doc_len for s in stats] + [np.array([seq_len], np.int64)])
    edges = _log_edges(lengths)
    counts = _counts(stats, "doc_len", edges)
    x = _Scale(float(edges[0]), float(edges[-1]), log=True)
    labels = [f"{s.name} ({s.num_docs:,})" for s in stats]
    return _Panel(
        "document length", "tokens per document (EOS incl.)", "documents", x, _linear_y(counts), edges,
        counts, labels, marker=(float(seq_len), f"seq_len {seq_len:,}"),
    )  # fmt: skip


def _segments_panel(stats: list[SplitStats]) -> _Panel:
    top = max((int(s.segs_per_row.max()) for s in stats if s.num_rows), default=1)
    edges = np.arange(0.5, top + 1.5)
    counts = _counts(stats, "segs_per_row", edges)
    x = _Scale(0.5, top + 0.5)
    labels = [s.name for s in stats]
    return _Panel("segments per row", "segments per row", "rows", x, _linear_y(counts), edges, counts, labels)


def _fill_panel(stats: list[SplitStats]) -> _Panel:
    edges = np.linspace(0, 1, NUM_LOG_BINS + 1)
    counts = _counts(stats, "row_len", edges, scale=lambda s: 1 / s.seq_len)
    y = _Scale(0.7, 2.0 * max((int(c.max(initial=0)) for c in counts), default=1) or 1.4, log=True)
    labels = [f"{s.name} (mean {s.fill:.2%})" for s in stats]
    return _Panel(
        "row fill (log scale)", "tokens / seq_len", "rows", _Scale(0.0, 1.0), y, edges, counts, labels,
        x_format="percent", legend="left",
    )  # fmt: skip


def card_figure(stats: dict[str, SplitStats], f: BinaryIO, mixture: MixtureInfo | None = None) -> None:
    """Write the card's PNG (document length, segments per row, row fill) to the binary file ``f``; a
    mixture adds a fourth panel, its asked and achieved shares."""
    splits = [s for s in stats.values() if s.num_docs]
    assert 1 <= len(splits) <= 2, "the card draws one or two non-empty splits (train, val)"
    canvas = Canvas(WIDTH + (PANEL_WIDTH if mixture is not None else 0), HEIGHT, PALETTE)
    for k, panel in enumerate((_doc_length_panel(splits), _segments_panel(splits), _fill_panel(splits))):
        _draw(canvas, k * PANEL_WIDTH, panel)
    if mixture is not None:
        _mixture_panel(canvas, 3 * PANEL_WIDTH, mixture)
    canvas.save(f)


MIX_LABEL_CHARS = 10
"""Characters of a source's name the mixture panel shows."""


def _mixture_panel(canvas: Canvas, x0: int, mixture: MixtureInfo) -> None:
    """Horizontal bars per source: the asked share (blue; none for a source in epochs), the achieved (orange)."""
    left, right = x0 + LEFT + 40, x0 + PANEL_WIDTH - RIGHT - 40
    top, bottom = TOP, HEIGHT - BOTTOM
    canvas.text((left + right) // 2, 16, "SHARE OF TRAIN TOKENS", BLACK, anchor="centre")
    sources = mixture.sources
    row = min(48, (bottom - top) // max(1, len(sources)))
    bar = max(2, (row - 8) // 2)
    for x in (left, right):
        canvas.vline(x, top, bottom, GRID)
    for k, s in enumerate(sources):
        y = top + k * row
        canvas.text(left - 6, y + bar - GLYPH_H, s.name[:MIX_LABEL_CHARS], BLACK, anchor="right")
        for j, (share, colour) in enumerate(
            ((s.share, SPLIT_COLOUR[1]), (s.achieved_share, SPLIT_COLOUR[2]))
        ):
            if share is None:
                continue
            end = left + round(min(share, 1.0) * (right - left))
            canvas.box(left, y + j * bar, max(end, left + 1), y + (j + 1) * bar - 1, colour)
            scale = 2 if bar >= 2 * GLYPH_H + 2 else 1
            canvas.text(
                end + 4, y + j * bar + (bar - scale * GLYPH_H) // 2, f"{share:.1%}", BLACK, scale=scale
            )
    _legend(canvas, [(SPLIT_COLOUR[1], "asked"), (SPLIT_COLOUR[2], "achieved")], left, bottom + 16)
