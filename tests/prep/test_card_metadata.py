"""`prep pack --license --language --source-dataset --description`: recorded in the manifest and written into
the card under the Hugging Face dataset-card keys; each checked lightly, with the fix in the message."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from prep.pipeline import PackConfig
from shared.contract import CARD_NAME
from shared.errors import ManifestError, UserError
from shared.manifest import CardInfo, Manifest
from tests.prep import clirun
from tests.prep.clirun import ok, run
from tests.prep.test_card import front_matter

failed_with = partial(clirun.failed_with, flat=True)
CARD_FLAGS = [
    "--license",
    "cc-by-4.0",
    "--language",
    "en",
    "--language",
    "yue",
    "--source-dataset",
    "reuters21578",
    "--source-dataset",
    "org/name: with a colon # and a hash",
    "--description",
    "News wires from 1987, packed for $pretraining.",
]


def pack(sample, out: Path, *extra: str):
    corpus, tok = sample
    return run("pack", corpus, "--tokenizer", tok, "--out", out, "--seq-len", "128", *extra)


@pytest.fixture(scope="module")
def described(sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card-metadata") / "out"
    ok(pack(sample, out, *CARD_FLAGS))
    return out


def test_card_options_are_in_the_manifest_and_the_card(described):
    m = Manifest.load(described)
    assert m.card == CardInfo(
        license="cc-by-4.0",
        language=("en", "yue"),
        source_datasets=("reuters21578", "org/name: with a colon # and a hash"),
        description="News wires from 1987, packed for $pretraining.",
    )
    card = (described / CARD_NAME).read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0"
    assert meta["language"] == ["en", "yue"]
    assert meta["source_datasets"] == ["reuters21578", "org/name: with a colon # and a hash"]
    assert "## Description\n\nNews wires from 1987, packed for $pretraining.\n" in card
    # The card's repack command gives them again.
    assert "--license cc-by-4.0 --description 'News wires from 1987, packed for $pretraining.'" in card
    assert "--language en --language yue --source-dataset reuters21578" in card


def test_without_card_options_nothing_is_written(sample, tmp_path):
    """Negative control: a plain pack's manifest has no `card` and its card no license or description."""
    ok(pack(sample, tmp_path / "out"))
    assert "card" not in json.loads((tmp_path / "out" / "manifest.json").read_text())
    card = (tmp_path / "out" / CARD_NAME).read_text(encoding="utf-8")
    assert "license" not in front_matter(card) and "## Description" not in card


def test_only_the_options_given_are_written(sample, tmp_path):
    ok(pack(sample, tmp_path / "out", "--language", "de"))
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert raw["card"] == {"language": ["de"]}
    assert front_matter((tmp_path / "out" / CARD_NAME).read_text())["language"] == ["de"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--license", "Apache 2.0"], "is not a license id. Pass an SPDX-style id in lower case"),
        (["--license", "MIT"], "`mit`"),
        (["--language", "English"], "is not a language code. Pass ISO 639-1 or 639-3 codes"),
        (["--language", "e"], "repeating --language for each language"),
        (["--source-dataset", " "], "pass one dataset name"),
        (["--description", ""], "--description is empty"),
    ],
)
def test_bad_card_options_say_the_fix(sample, tmp_path, flags, message):
    failed_with(pack(sample, tmp_path / "out", *flags), message)
    assert not (tmp_path / "out").exists()


def test_config_takes_the_same_values(tmp_path):
    """A library caller passes them through PackConfig: the same checks apply there."""
    PackConfig(inputs=("a",), tokenizer="t", out=tmp_path, license="other", language=("en-gb",))
    with pytest.raises(UserError, match="not a language code"):
        PackConfig(inputs=("a",), tokenizer="t", out=tmp_path, language=("EN",))


def test_an_edited_card_record_is_refused_by_name(described, tmp_path):
    raw = json.loads((described / "manifest.json").read_text())
    raw["card"]["language"] = "en"
    with pytest.raises(ManifestError, match="card.language"):
        Manifest.from_dict(raw)
    raw["card"]["language"] = ["en", 3]
    with pytest.raises(ManifestError, match="expected a list of strings"):
        Manifest.from_dict(raw)
    raw["card"] = {"licence": "mit"}
    with pytest.raises(ManifestError, match="card.licence"):
        Manifest.from_dict(raw)


RECIPE_CARD = """
[sources.all]
inputs = [{corpus}]
share = 1.0

[card]
license = "cc-by-4.0"
language = ["en", "yue"]
description = "News wires from 1987."
"""


def write_recipe(sample, folder: Path, text: str = RECIPE_CARD) -> Path:
    path = folder / "mix.toml"
    path.write_text(text.format(corpus=json.dumps(str(sample[0]))), encoding="utf-8")
    return path


def pack_recipe(sample, recipe: Path, out: Path, *extra: str):
    return run("pack", "--recipe", recipe, "--tokenizer", sample[1], "--out", out, "--seq-len", "128", *extra)


def test_a_recipe_card_table_joins_the_flags(sample, tmp_path):
    """The recipe gives license, language and description, a flag the source dataset: the card has all four,
    and its repack command gives them as flags (which a `--source` mixture takes)."""
    out = tmp_path / "out"
    ok(pack_recipe(sample, write_recipe(sample, tmp_path), out, "--source-dataset", "reuters21578"))
    m = Manifest.load(out)
    assert m.card == CardInfo(
        license="cc-by-4.0",
        language=("en", "yue"),
        source_datasets=("reuters21578",),
        description="News wires from 1987.",
    )
    card = (out / CARD_NAME).read_text(encoding="utf-8")
    meta = front_matter(card)
    assert (meta["license"], meta["language"], meta["source_datasets"]) == (
        "cc-by-4.0",
        ["en", "yue"],
        ["reuters21578"],
    )
    assert "## Description\n\nNews wires from 1987.\n" in card
    assert "--license cc-by-4.0 --description 'News wires from 1987.' --language en --language yue" in card


def test_a_key_given_by_flag_and_recipe_is_refused(sample, tmp_path):
    """Neither may silently win: the message names both values and what to drop."""
    recipe = write_recipe(sample, tmp_path)
    failed_with(
        pack_recipe(sample, recipe, tmp_path / "out", "--language", "de"),
        "--language ['de'] is given and recipe",
        "sets `card.language` ['en', 'yue']; keep one: drop --language, or the key from the recipe.",
    )
    failed_with(pack_recipe(sample, recipe, tmp_path / "out", "--license", "mit"), "drop --license")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ('license = "MIT"', "`card.license` 'MIT' is not a license id"),
        ('language = ["English"]', 'one string per language in a list (`language = ["en", "de"]`)'),
        ("language = 3", "`card.language` is an integer; give a list of strings"),
        ('source_datasets = [""]', "`card.source_datasets` '' is empty"),
        ('description = " "', "`card.description` is empty"),
        ('licence = "mit"', "unknown key `card.licence`; the keys here are license, language"),
        ("license = 2", "`card.license` is an integer"),
    ],
)
def test_bad_recipe_card_keys_are_named_with_the_fix(sample, tmp_path, card, message):
    text = "[sources.all]\ninputs = [{corpus}]\nshare = 1.0\n\n[card]\n" + card + "\n"
    failed_with(pack_recipe(sample, write_recipe(sample, tmp_path, text), tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_a_recipe_without_card_writes_none(sample, tmp_path):
    """Negative control for the merge: no `[card]` and no flag, no `card` in the manifest."""
    text = RECIPE_CARD[: RECIPE_CARD.index("[card]")]
    ok(pack_recipe(sample, write_recipe(sample, tmp_path, text), tmp_path / "out"))
    assert Manifest.load(tmp_path / "out").card is None
