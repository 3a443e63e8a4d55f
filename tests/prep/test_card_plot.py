"""The card's PNG: a valid file any reader opens, bars as tall as their counts; no matplotlib or pandas in `prep pack`."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from prep.card_plot import HEIGHT, PALETTE, PANEL_WIDTH, SPLIT_COLOUR, TOP, WIDTH, card_figure
from prep.png import PNG_MAGIC, Canvas, encode_png
from prep.stats import SplitStats

REPO = Path(__file__).resolve().parents[2]


def decode_png(data: bytes) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(palette indices, palette) of an 8-bit indexed PNG with unfiltered scanlines; checks every CRC."""
    assert data[:8] == PNG_MAGIC
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"chunk {kind!r}: CRC mismatch")
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour_type) == (8, 3)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert not rows[:, 0].any(), "every scanline uses filter 0"
    plte = chunks[b"PLTE"]
    return rows[:, 1:], [tuple(plte[i : i + 3]) for i in range(0, len(plte), 3)]


def stats(name: str, *, doc_len, segs_per_row, row_len, seq_len: int = 64) -> SplitStats:
    a = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return SplitStats(name, seq_len, a(row_len), a(segs_per_row), a(doc_len), np.ones(len(doc_len), np.int64))


def test_png_round_trips_and_a_flipped_byte_is_caught():
    canvas = Canvas(7, 3, [(255, 255, 255), (1, 2, 3)])
    canvas.box(1, 1, 5, 2, 1)
    data = canvas.png()
    pixels, palette = decode_png(data)
    assert palette == [(255, 255, 255), (1, 2, 3)]
    assert pixels.tolist() == [[0] * 7, [0, 1, 1, 1, 1, 0, 0], [0] * 7]
    broken = bytearray(data)
    broken[-20] ^= 0x01  # inside the IDAT chunk
    with pytest.raises(ValueError, match="CRC mismatch"):
        decode_png(bytes(broken))


def test_a_standard_reader_opens_the_card_png():
    image = pytest.importorskip("PIL.Image")
    s = stats("train", doc_len=[3, 5, 9, 30], segs_per_row=[1, 2, 1], row_len=[60, 64, 40])
    f = io.BytesIO()
    card_figure({"train": s}, f)
    with image.open(io.BytesIO(f.getvalue())) as img:
        img.load()
        assert img.size == (WIDTH, HEIGHT) and img.mode == "P"
        assert np.array_equal(np.asarray(img), decode_png(f.getvalue())[0])


def column_height(pixels: np.ndarray, x: int, colour: int) -> int:
    return int((pixels[TOP:, x] == colour).sum())


def test_bars_are_as_tall_as_their_counts():
    # Segments per row: 40 rows with 1 segment, 20 with 2, 10 with 4 (none with 3).
    segs = [1] * 40 + [2] * 20 + [4] * 10
    train = stats("train", doc_len=[10] * 5, segs_per_row=segs, row_len=[64] * 70)
    f = io.BytesIO()
    card_figure({"train": train}, f)
    pixels, palette = decode_png(f.getvalue())
    assert palette == PALETTE
    # The middle panel's plot spans bins 0.5..4.5 over its width; sample each bin's centre column.
    left, right = PANEL_WIDTH + 80, 2 * PANEL_WIDTH - 30
    centre = lambda k: left + round((k - 0.5) / 4 * (right - left))  # noqa: E731
    blue = SPLIT_COLOUR[1]
    heights = [column_height(pixels, centre(k), blue) for k in (1, 2, 3, 4)]
    assert heights[2] == 0, "a bin without rows has no bar"
    assert abs(heights[0] - 2 * heights[1]) <= 2 and abs(heights[1] - 2 * heights[3]) <= 2, heights
    assert heights[0] > 200, "the tallest bar fills most of the plot"


def test_two_splits_overlap_in_their_own_colour_and_drawing_is_deterministic():
    train = stats("train", doc_len=[10, 20, 20], segs_per_row=[1, 2], row_len=[30, 20])
    val = stats("val", doc_len=[20], segs_per_row=[1], row_len=[20])
    drawn = []
    for _ in range(2):
        f = io.BytesIO()
        card_figure({"train": train, "val": val}, f)
        drawn.append(f.getvalue())
    assert drawn[0] == drawn[1]
    pixels, _ = decode_png(drawn[0])
    assert {SPLIT_COLOUR[1], SPLIT_COLOUR[2], SPLIT_COLOUR[3]} <= set(np.unique(pixels).tolist())
    other = io.BytesIO()
    card_figure({"train": train}, other)
    assert other.getvalue() != drawn[0]


def test_single_document_and_empty_val_split_still_draw():
    one = stats("train", doc_len=[5], segs_per_row=[1], row_len=[5])
    empty = stats("val", doc_len=[], segs_per_row=[], row_len=[])
    f = io.BytesIO()
    card_figure({"train": one, "val": empty}, f)
    assert decode_png(f.getvalue())[0].shape == (HEIGHT, WIDTH)


def test_encoder_refuses_a_pixel_outside_the_palette():
    with pytest.raises(AssertionError, match="palette"):
        encode_png(np.full((2, 2), 3, np.uint8), [(0, 0, 0)])


def test_pack_imports_neither_matplotlib_nor_pandas(sample, tmp_path):
    """Their imports alone cost more than packing a small corpus (pyarrow's `pa.array` and `to_numpy`
    import pandas on first use)."""
    corpus, tok = sample
    code = (
        "import sys; from pathlib import Path; from prep.pipeline import PackConfig, pack;"
        f" pack(PackConfig(inputs=({str(corpus)!r},), tokenizer={str(tok)!r}, out=Path({str(tmp_path / 'o')!r}),"
        " val_fraction=0.1)); print(sorted(m for m in ('matplotlib', 'PIL', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "o" / "card_lengths.png").read_bytes()[:8] == PNG_MAGIC
