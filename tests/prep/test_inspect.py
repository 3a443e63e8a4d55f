"""`prep inspect`: summary, readable row view at 100 columns, the attention-mask picture, and the PNG."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from prep.cli import app
from prep.pipeline import PackConfig, pack
from prep.show import InspectConfig, inspect_dataset, mask_text
from prep.stats import mask_cells
from shared.contract import MANIFEST_NAME
from shared.reader import PackedDataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def packed(sample, tmp_path_factory) -> Path:
    corpus, tok = sample
    out = tmp_path_factory.mktemp("inspect") / "packed"
    pack(PackConfig(inputs=(str(corpus),), tokenizer=str(tok), out=out, seq_len=256, val_fraction=0.05))
    return out


def busiest_row(folder: Path) -> int:
    split = PackedDataset(folder).split("train")
    return max(range(split.num_rows), key=lambda i: split.row(i).num_segments)


def render(cfg: InspectConfig) -> str:
    buffer = io.StringIO()
    inspect_dataset(cfg, Console(width=100, file=buffer, color_system=None))
    return buffer.getvalue()


def brute_force_mask(cu: list[int]) -> np.ndarray:
    n = cu[-1]
    seg = np.searchsorted(cu, np.arange(n), side="right") - 1
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return (seg[q] == seg[k]) & (k <= q)


def test_mask_cells_equal_the_true_mask_when_not_downsampled():
    cu = [0, 3, 4, 9]
    frac, seg = mask_cells(np.array(cu), 64)
    assert np.array_equal(frac == 1.0, brute_force_mask(cu))
    assert set(np.unique(frac)) == {0.0, 1.0}
    assert seg.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]


def test_mask_cells_downsampled_keep_the_exact_share_of_allowed_pairs():
    rng = np.random.default_rng(0)
    cu = [0, *np.sort(rng.choice(np.arange(1, 300), size=6, replace=False)).tolist(), 300]
    frac, _ = mask_cells(np.array(cu), 16)
    edges = (np.arange(17) * 300) // 16
    area = np.diff(edges)[:, None] * np.diff(edges)[None, :]
    assert int(round((frac * area).sum())) == int(brute_force_mask(cu).sum())


def test_mask_text_is_block_diagonal_and_causal():
    lines = mask_text(np.array([0, 2, 4])).plain.splitlines()[1:]
    assert lines == ["  # . . . ", "  # # . . ", "  . . # . ", "  . . # # "]


def test_row_view_is_readable_at_100_columns(packed):
    row = busiest_row(packed)
    text = render(InspectConfig(root=packed, row=row))
    assert max(len(line) for line in text.splitlines()) <= 100
    for expected in (
        "dataset",
        "document length",
        "segment 0: doc_id",
        "segment 1: doc_id",
        "-100 (ignored)",
    ):
        assert expected in text
    assert "<|endoftext|>" in text and "ends the document (EOS)" in text
    assert "attention mask" in text


def test_row_view_without_tokenizer_shows_ids(packed, tmp_path):
    copy = tmp_path / "packed"
    shutil.copytree(packed, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["tokenizer"]["path"] = str(tmp_path / "gone")
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    text = render(InspectConfig(root=copy, row=0))
    assert "showing ids" in text and "<|endoftext|>" not in text


@pytest.mark.slow
def test_cli_inspect_writes_the_png(packed, tmp_path):
    png = tmp_path / "row.png"
    row = busiest_row(packed)
    result = CliRunner().invoke(app, ["inspect", str(packed), "--row", str(row), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "attention mask" in result.output and f"wrote {png}" in result.output
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_cli_inspect_summary_only(packed):
    result = CliRunner().invoke(app, ["inspect", str(packed)])
    assert result.exit_code == 0, result.output
    assert "fill" in result.output and "attention mask" not in result.output


def test_cli_inspect_row_out_of_range(packed):
    result = CliRunner().invoke(app, ["inspect", str(packed), "--row", "100000"])
    assert result.exit_code == 1
    assert "--row 100000 is out of range" in result.output
