"""Hugging Face datasets by name (`hf:ORG/NAME`) from the local `datasets` cache, offline.

`datasets` reads its configuration when imported, so the CLI runs in a subprocess with the environment a
user sets (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1, HF_DATASETS_CACHE) and no network; a subprocess
importing `datasets` takes seconds, so these tests are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from tests.prep import clirun
from tests.prep.clirun import ok, run
from tests.prep.hub_cache import write_cached_dataset

failed_with = partial(clirun.failed_with, flat=True)
TRAIN = ["first document of the hub", "second one, longer " * 40, "  ", "the third"]
TEST = ["a held-out document"]


def prep_cli(*args: str | Path, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "hf-home"),
    }
    return subprocess.run(
        [sys.executable, "-c", "from prep.cli import main; main()", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def cache(tmp_path) -> tuple[Path, list[Path]]:
    cache = tmp_path / "datasets-cache"
    return cache, write_cached_dataset(cache, "testorg/tiny", {"train": TRAIN, "test": TEST})


@pytest.mark.slow
def test_hub_dataset_by_name_packs_like_the_same_records_in_jsonl(sample, cache, tmp_path):
    _, tok = sample
    folder, files = cache
    common = ["--tokenizer", tok, "--seq-len", "64"]
    done = prep_cli(
        "pack",
        "hf:testorg/tiny",
        "--dataset-split",
        "train",
        "--out",
        "hub",
        *common,
        cache=folder,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN))
    ok(run("pack", tmp_path / "same.jsonl", "--out", tmp_path / "plain", *common))
    for shard in sorted((tmp_path / "plain").glob("*.arrow")):
        assert (tmp_path / "hub" / shard.name).read_bytes() == shard.read_bytes()
    [info] = json.loads((tmp_path / "hub" / "manifest.json").read_text())["inputs"]
    train = files[0]
    assert info == {
        "path": "hf:testorg/tiny",
        "format": "hf-dataset",
        "first_doc_id": 0,
        "num_records": len(TRAIN),
        "dataset_split": "train",
        "num_bytes": train.stat().st_size,
        "mtime_ns": train.stat().st_mtime_ns,
        "sha256": hashlib.sha256(train.read_bytes()).hexdigest(),
    }
    checked = prep_cli("verify", "hub", "--inputs", "--source", "hf:testorg/tiny", cache=folder, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert "sources, inputs" in " ".join(checked.stdout.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["hf:testorg/tiny"],
            "dataset `hf:testorg/tiny` has splits train, test; choose the one to pack with `--dataset-split NAME`",
        ),
        (
            ["hf:testorg/tiny", "--dataset-split", "validation"],
            "has no split `validation` (its splits: train, test)",
        ),
        (["hf:testorg/other"], "Offline, `datasets` reads only its cache"),
        (["hf:a/b/c.jsonl"], "is not a dataset name: write `hf:ORG/NAME`"),
    ],
)
def test_hub_mistakes_say_the_fix(sample, cache, tmp_path, args, message):
    _, tok = sample
    done = prep_cli("pack", *args, "--tokenizer", tok, "--out", "out", cache=cache[0], cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in " ".join((done.stdout + done.stderr).split())
    assert "Traceback" not in done.stderr


def test_a_missing_path_is_never_a_hub_lookup(sample, tmp_path):
    """Negative control: `testorg/tiny` without the prefix is a path that does not exist."""
    _, tok = sample
    failed_with(
        run("pack", "testorg/tiny", "--tokenizer", tok, "--out", tmp_path / "out"),
        "input `testorg/tiny` does not exist",
    )
