"""The data card: HF dataset-card form, derived from manifest + shards, deterministic, rebuilt by `prep card`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prep.card import CARD_TEMPLATE, PLOT_NAME
from prep.cli import app
from prep.pipeline import PackConfig, pack
from shared.contract import CARD_NAME
from shared.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]
DATA_CARDS = REPO / "data_cards"
BUNDLED = ("sample", "reuters21578", "ectsum")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pack_sample(sample, out: Path, overwrite: bool = False) -> Manifest:
    corpus, tok = sample
    return pack(
        PackConfig(
            inputs=(str(corpus),),
            tokenizer=str(tok),
            out=out,
            seq_len=256,
            val_fraction=0.05,
            overwrite=overwrite,
        )
    )


@pytest.fixture(scope="module")
def packed(sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "packed"
    pack_sample(sample, out)
    return out


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card must open with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_pack_writes_the_card_with_its_plot(packed):
    card = (packed / CARD_NAME).read_text(encoding="utf-8")
    meta = front_matter(card)
    m = Manifest.load(packed)
    files = meta["configs"][0]["data_files"]
    assert [f["split"] for f in files] == list(m.splits)
    assert meta["packed_shards"]["tokenizer_sha256"] == m.tokenizer.sha256
    assert f"![Document length, segments per row and row fill]({PLOT_NAME})" in card
    assert (packed / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    # Shards stay the only Arrow files beside the card.
    shards = {sh.file for s in m.splits.values() for sh in s.shards}
    assert {p.name for p in packed.glob("*.arrow")} == shards


def test_card_numbers_come_from_the_manifest(packed):
    card = (packed / CARD_NAME).read_text(encoding="utf-8")
    m = Manifest.load(packed)
    d = m.documents
    assert f"{d.docs_in:,} == {d.packed:,} + {d.dropped:,} + {d.skipped:,} (holds)" in card
    for name, s in m.splits.items():
        assert f"| {name} | {s.num_docs:,} |" in card
        assert f"| {s.num_tokens:,} | {s.num_target_tokens:,} |" in card
    assert m.tokenizer.sha256 in card
    assert f"prep verify {packed} --tokenizer {m.tokenizer.path} --source {m.inputs[0].path}" in card
    assert f"prep inspect {packed} --row 0" in card
    assert "tokens per document" in card and "segments per row" in card


def test_repacking_gives_the_same_card_and_plot(packed, sample):
    card, plot = (packed / CARD_NAME).read_bytes(), (packed / PLOT_NAME).read_bytes()
    pack_sample(sample, packed, overwrite=True)
    assert (packed / CARD_NAME).read_bytes() == card
    assert (packed / PLOT_NAME).read_bytes() == plot


def test_cli_card_rebuilds_the_same_card(packed):
    card, plot = (packed / CARD_NAME).read_bytes(), (packed / PLOT_NAME).read_bytes()
    (packed / CARD_NAME).unlink()
    (packed / PLOT_NAME).unlink()
    result = CliRunner().invoke(app, ["card", str(packed)])
    assert result.exit_code == 0, result.output
    assert (packed / CARD_NAME).read_bytes() == card
    assert (packed / PLOT_NAME).read_bytes() == plot


def test_cli_card_on_a_folder_without_manifest(tmp_path):
    result = CliRunner().invoke(app, ["card", str(tmp_path)])
    assert result.exit_code == 1 and "no manifest.json" in result.output


def test_template_copy_in_data_cards_matches_the_code():
    assert (DATA_CARDS / "TEMPLATE.md").read_text(encoding="utf-8") == CARD_TEMPLATE


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_cards_are_complete(name):
    folder = DATA_CARDS / name
    card = (folder / CARD_NAME).read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["packed_shards"]["seq_len"] > 0
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card):
        assert (folder / image).read_bytes()[:8] == PNG_MAGIC
    assert not list(folder.glob("*.arrow")) and not (folder / "manifest.json").exists()


def test_bundled_sample_card_is_current(tmp_path, monkeypatch):
    """The sample card in data_cards/ is what `prep demo demo` writes today (else regenerate it)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "demo"])
    assert result.exit_code == 0, result.output
    fresh = (tmp_path / "demo" / "packed" / CARD_NAME).read_text(encoding="utf-8")
    assert fresh == (DATA_CARDS / "sample" / CARD_NAME).read_text(encoding="utf-8"), (
        "data_cards/sample is stale: regenerate it as data_cards/README.md says"
    )
