"""Hugging Face datasets by name (`hf:ORG/NAME`) from the local `datasets` cache, offline; fsspec URLs
(`memory://`, `file://`) packed to the bytes of the same files given by path.

`datasets` reads its configuration when imported, so the CLI runs in a subprocess with the environment a
user sets (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1, HF_DATASETS_CACHE) and no network; a subprocess
importing `datasets` takes seconds, so the mistakes share one, and the pack-and-verify test is marked slow.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from shared.fileio import sha256_file
from tests.prep import clirun
from tests.prep.clirun import ok, run
from tests.prep.hub_cache import write_cached_dataset

failed_with = partial(clirun.failed_with, flat=True)
TRAIN = ["first document of the hub", "second one, longer " * 40, "  ", "the third"]
TEST = ["a held-out document"]


def prep_cli(
    *args: str | Path, cache: Path, cwd: Path, code: str = "from prep.cli import main; main()"
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "hf-home"),
    }
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
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
    [plain] = json.loads((tmp_path / "plain" / "manifest.json").read_text())["inputs"]
    train = files[0]
    assert info == {
        "path": "hf:testorg/tiny",
        "format": "hf-dataset",
        "first_doc_id": 0,
        "num_records": len(TRAIN),
        "dataset_split": "train",
        "num_docs": plain["num_docs"],
        "num_tokens": plain["num_tokens"],
        "num_bytes": train.stat().st_size,
        "mtime_ns": train.stat().st_mtime_ns,
        "sha256": hashlib.sha256(train.read_bytes()).hexdigest(),
    }
    checked = prep_cli("verify", "hub", "--inputs", "--source", "hf:testorg/tiny", cache=folder, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert "sources, inputs" in " ".join(checked.stdout.split())


HUB_MISTAKES = [
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
]
# The mistakes in one subprocess (it imports `datasets` once), each through Typer's runner as a user runs it.
RUN_EACH = """
import json, sys
from typer.testing import CliRunner
from prep.cli import app
print(json.dumps([[r.exit_code, r.output] for r in (CliRunner().invoke(app, a) for a in json.loads(sys.argv[1]))]))
"""


@pytest.mark.slow
def test_hub_mistakes_say_the_fix(sample, cache, tmp_path):
    _, tok = sample
    runs = [["pack", *args, "--tokenizer", str(tok), "--out", "out"] for args, _ in HUB_MISTAKES]
    done = prep_cli(json.dumps(runs), cache=cache[0], cwd=tmp_path, code=RUN_EACH)
    assert done.returncode == 0, done.stderr
    for (exit_code, output), (_, message) in zip(json.loads(done.stdout), HUB_MISTAKES, strict=True):
        assert exit_code == 1 and "Traceback" not in output, output
        assert message in " ".join(output.split()), output


def test_a_missing_path_is_never_a_hub_lookup(sample, tmp_path):
    """Negative control: `testorg/tiny` without the prefix is a path that does not exist."""
    _, tok = sample
    failed_with(
        run("pack", "testorg/tiny", "--tokenizer", tok, "--out", tmp_path / "out"),
        "input `testorg/tiny` does not exist",
    )


# --- fsspec URLs: the in-memory and the local filesystem, in this process ---------------------------------


@pytest.fixture
def bucket(tmp_path):
    """A folder of fsspec's in-memory filesystem for this test alone."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}"
    yield fs, f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.mark.slow
def test_memory_url_glob_packs_like_the_local_files(sample, bucket, tmp_path):
    corpus, tok = sample
    fs, root = bucket
    data = corpus.read_bytes()
    lines = data.splitlines(keepends=True)
    parts = [b"".join(lines[: len(lines) // 2]), b"".join(lines[len(lines) // 2 :])]
    local = []
    for k, part in enumerate(parts):
        compressed = gzip.compress(part, mtime=0)
        fs.pipe(f"{root}/news/{k}.jsonl.gz", compressed)
        local.append(tmp_path / f"{k}.jsonl.gz")
        local[-1].write_bytes(compressed)
    common = ["--tokenizer", tok, "--seq-len", "128"]
    ok(run("pack", f"{root}/news/*.jsonl.gz", "--out", tmp_path / "url", *common))
    ok(run("pack", *local, "--out", tmp_path / "local", *common))
    for shard in sorted((tmp_path / "local").glob("*.arrow")):
        assert (tmp_path / "url" / shard.name).read_bytes() == shard.read_bytes()
    inputs = json.loads((tmp_path / "url" / "manifest.json").read_text())["inputs"]
    # A glob's matches are named as fsspec names them.
    assert [i["path"] for i in inputs] == [
        fs.unstrip_protocol(f"{root[9:]}/news/{k}.jsonl.gz") for k in range(2)
    ]
    for info, path in zip(inputs, local, strict=True):
        assert "mtime_ns" not in info  # a URL's modification time is not recorded
        assert (info["num_bytes"], info["sha256"]) == (path.stat().st_size, sha256_file(path))
    assert "documents, inputs" in " ".join(ok(run("verify", tmp_path / "url", "--inputs")).split())
    fs.pipe(f"{root}/news/1.jsonl.gz", gzip.compress(parts[1], mtime=1))  # negative control: changed bytes
    failed_with(run("verify", tmp_path / "url", "--inputs"), "inputs changed since packing")


@pytest.mark.slow
def test_file_url_parquet_packs_like_the_path(sample, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, tok = sample
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=64)
    common = ["--tokenizer", tok, "--seq-len", "128"]
    ok(run("pack", (tmp_path / "a.parquet").as_uri(), "--out", tmp_path / "url", *common))
    ok(run("pack", tmp_path / "a.parquet", "--out", tmp_path / "path", *common))
    for shard in sorted((tmp_path / "path").glob("*.arrow")):
        assert (tmp_path / "url" / shard.name).read_bytes() == shard.read_bytes()
    [info] = json.loads((tmp_path / "url" / "manifest.json").read_text())["inputs"]
    assert info["path"] == (tmp_path / "a.parquet").as_uri() and info["sha256"] == sha256_file(
        tmp_path / "a.parquet"
    )


def test_url_mistakes_say_the_fix(sample, bucket, tmp_path):
    _, tok = sample
    fs, root = bucket
    fs.pipe(f"{root}/a.xml", b"<doc/>")
    fs.pipe(f"{root}/b.jsonl", gzip.compress(b'{"text": "x"}\n'))

    def pack(url: str):
        return run("pack", url, "--tokenizer", tok, "--out", tmp_path / "out")

    failed_with(pack("zzz://bucket/a.jsonl"), "Protocol not known: zzz", "Use a scheme fsspec knows")
    failed_with(pack(root), "is a folder; name its files, or a glob such as")
    failed_with(pack(f"{root}/a.xml"), "is an unsupported type; a URL names a")
    failed_with(pack(f"{root}/missing.jsonl"), "does not exist; check the URL")
    failed_with(pack(f"{root}/*.csv"), "matches no files")
    failed_with(pack(f"{root}/b.jsonl"), "is gzip-compressed but its name does not end in .gz")
