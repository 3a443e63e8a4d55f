"""A tiny raster canvas and PNG encoder (numpy + zlib): filled boxes, lines and 5x7 bitmap text.

The data card's picture is drawn here instead of with matplotlib, whose import and ``savefig`` would
cost every `prep pack` more than packing a small corpus. The canvas is an
array of palette indices; the file is an indexed-colour PNG (IHDR, PLTE, IDAT, IEND, each with its
CRC-32), compressed at a fixed zlib level and carrying no timestamp, so the same drawing gives the same
bytes (for a given zlib).
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GLYPH_W, GLYPH_H = 5, 7

# Rows of each glyph, top to bottom, as 5-bit strings. Lower-case text is drawn in capitals.
_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    " ": "00000 00000 00000 00000 00000 00000 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000",
    ",": "00000 00000 00000 00000 01100 00100 01000",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    "%": "11000 11001 00010 00100 01000 10011 00011",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    "=": "00000 00000 11111 00000 11111 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000",
    "_": "00000 00000 00000 00000 00000 00000 11111",
    "<": "00010 00100 01000 10000 01000 00100 00010",
    ">": "01000 00100 00010 00001 00010 00100 01000",
    "?": "01110 10001 00001 00010 00100 00000 00100",
}
FONT = {
    ch: np.array([[bit == "1" for bit in row] for row in rows.split()], dtype=bool)
    for ch, rows in _FONT_ROWS.items()
}


def text_width(text: str, scale: int) -> int:
    """Pixels that :meth:`Canvas.text` needs for ``text`` at ``scale`` (one blank column between glyphs)."""
    return max(0, len(text) * (GLYPH_W + 1) * scale - scale)


class Canvas:
    """An image of palette indices (0 is the background); drawing clips silently at the edges."""

    def __init__(self, width: int, height: int, palette: list[tuple[int, int, int]]) -> None:
        assert 1 <= len(palette) <= 256, "an indexed PNG holds 1 to 256 colours"
        self.pixels = np.zeros((height, width), dtype=np.uint8)
        self.palette = palette

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    def box(self, x0: int, y0: int, x1: int, y1: int, colour: int) -> None:
        """Fill ``[x0, x1) x [y0, y1)``."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 < x1 and y0 < y1:
            self.pixels[y0:y1, x0:x1] = colour

    def hline(self, x0: int, x1: int, y: int, colour: int, dash: int = 0) -> None:
        for a in range(x0, x1, 2 * dash) if dash else [x0]:
            self.box(a, y, min(x1, a + dash) if dash else x1, y + 1, colour)

    def vline(self, x: int, y0: int, y1: int, colour: int, dash: int = 0) -> None:
        for a in range(y0, y1, 2 * dash) if dash else [y0]:
            self.box(x, a, x + 1, min(y1, a + dash) if dash else y1, colour)

    def text(self, x: int, y: int, text: str, colour: int, scale: int = 2, anchor: str = "left") -> None:
        """Draw ``text`` with its top at ``y``; ``anchor`` says whether ``x`` is its left, centre or right."""
        width = text_width(text, scale)
        x -= {"left": 0, "centre": width // 2, "right": width}[anchor]
        for ch in text.upper():
            glyph = FONT.get(ch, FONT["?"])
            block = np.kron(glyph, np.ones((scale, scale), dtype=bool))
            ys, xs = np.nonzero(block)
            ys, xs = ys + y, xs + x
            inside = (ys >= 0) & (ys < self.height) & (xs >= 0) & (xs < self.width)
            self.pixels[ys[inside], xs[inside]] = colour
            x += (GLYPH_W + 1) * scale

    def png(self) -> bytes:
        return encode_png(self.pixels, self.palette)

    def save(self, f: BinaryIO) -> None:
        f.write(self.png())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, palette: list[tuple[int, int, int]]) -> bytes:
    """An 8-bit indexed-colour PNG of ``pixels`` (uint8 palette indices, height x width)."""
    assert pixels.dtype == np.uint8 and pixels.ndim == 2, "pixels must be a 2-D uint8 array"
    assert int(pixels.max(initial=0)) < len(palette), "a pixel names a colour the palette lacks"
    height, width = pixels.shape
    # Every scanline starts with its filter type; 0 (none) compresses well enough on flat drawings.
    scanlines = np.hstack([np.zeros((height, 1), dtype=np.uint8), pixels])
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return b"".join(
        [
            PNG_MAGIC,
            _chunk(b"IHDR", header),
            _chunk(b"PLTE", bytes(c for rgb in palette for c in rgb)),
            _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9)),
            _chunk(b"IEND", b""),
        ]
    )
