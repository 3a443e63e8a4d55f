"""`prep pack --executor ray` on a local 2-CPU Ray cluster writes the very bytes the local executor writes.

One Ray instance serves the module (starting it takes seconds on 2 cores). The inputs are the bundled
sample cut into four files plus an empty file and a file with a blank and a malformed record, so that
pass 1 runs as several tasks, doc ids must be offset by the records of earlier files, skipped records
must be summed across tasks, and the small shards make several shard-writing tasks per split.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep import executor_ray, pipeline
from prep.cli import app
from prep.readers import InputError, InputFile
from prep.tokenizer import load_tokenizer
from shared.errors import UserError
from shared.manifest import Manifest

try:
    import ray
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the dev extra, which includes ray: its absence is a failure there
    pytest.skip("needs ray (pip install '.[ray]')", allow_module_level=True)

# Under pytest-xdist (--dist loadgroup) these tests share one worker, so one local Ray cluster runs at a time.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(sample, tmp_path_factory) -> tuple[list[str], Path]:
    corpus, tokenizer = sample
    folder = tmp_path_factory.mktemp("ray-inputs")
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    paths = []
    for k in range(4):
        path = folder / f"part{k}.jsonl"
        path.write_text("".join(lines[k::4]), encoding="utf-8")
        paths.append(path)
    (folder / "empty.jsonl").write_text("", encoding="utf-8")
    bad = folder / "bad.jsonl"
    bad.write_text(
        json.dumps({"text": "   "}) + "\n{not json\n" + json.dumps({"text": "the last one"}) + "\n",
        encoding="utf-8",
    )
    order = [paths[0], folder / "empty.jsonl", paths[1], bad, paths[2], paths[3]]
    return [str(p) for p in order], tokenizer


def pack_args(inputs: tuple[list[str], Path], out: Path, *extra: str) -> list[str]:
    paths, tokenizer = inputs
    return [
        "pack",
        *paths,
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--seq-len",
        "256",
        "--val-fraction",
        "0.05",
        "--rows-per-shard",
        "40",
        "--skip-invalid",
        *extra,
    ]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the card's mentions of the folder's own path are neutralised (it names it)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    files["README.md"] = files["README.md"].replace(str(folder).encode(), b"OUT")
    return files


@pytest.fixture(scope="module")
def local_files(inputs, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "out"
    # `--engine`, the option's earlier name, still works: users may have scripts that pass it.
    result = CliRunner().invoke(app, pack_args(inputs, out, "--engine", "local"))
    assert result.exit_code == 0, result.output
    return folder_bytes(out)


@pytest.mark.slow
def test_ray_executor_writes_the_local_executor_bytes(ray_cluster, inputs, local_files, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, pack_args(inputs, out, "--executor", "ray"))
    assert result.exit_code == 0, result.output
    ray_files = folder_bytes(out)
    assert sorted(ray_files) == sorted(local_files), "different files, or the work folder was left behind"
    differing = [name for name in local_files if ray_files[name] != local_files[name]]
    assert not differing, f"files differ between executors: {differing}"

    # The comparison covered what it is meant to: several shard tasks per split, offsets across files.
    manifest = Manifest.load(out)
    assert len(manifest.splits["train"].shards) >= 3 and len(manifest.splits["val"].shards) >= 1
    assert [i.num_records for i in manifest.inputs][:4] == [101, 0, 100, 3]
    assert manifest.inputs[2].first_doc_id == 101 and manifest.inputs[4].first_doc_id == 204
    assert all(i.sha256 and i.mtime_ns for i in manifest.inputs)  # the fingerprints, hashed in the tasks
    docs = manifest.documents
    assert (docs.skipped_empty, docs.skipped_invalid) == (2, 1)  # the sample has one blank record too


@pytest.mark.slow
def test_comparison_catches_per_file_doc_ids(ray_cluster, inputs, local_files, tmp_path, monkeypatch):
    """Negative control: the classic distributed bug (each worker numbers its documents from 0) is caught."""
    monkeypatch.setattr(executor_ray, "first_doc_ids", lambda parts: [0] * len(parts))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, pack_args(inputs, out, "--executor", "ray"))
    assert result.exit_code == 0, result.output
    ray_files = folder_bytes(out)
    assert ray_files["manifest.json"] != local_files["manifest.json"]
    assert any(ray_files[n] != local_files[n] for n in local_files if n.endswith(".arrow"))


@pytest.mark.slow
def test_bad_record_stops_the_ray_run_and_leaves_out_as_it_was(ray_cluster, inputs, tmp_path):
    out = tmp_path / "out"
    args = [a for a in pack_args(inputs, out, "--executor", "ray") if a != "--skip-invalid"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert f"{inputs[0][3]}:2: malformed JSON" in result.output and "--skip-invalid" in result.output
    assert not out.exists()


def test_missing_ray_names_the_extra(sample, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    corpus, tokenizer = sample
    cfg = pipeline.PackConfig(
        inputs=(str(corpus),), tokenizer=str(tokenizer), out=tmp_path / "o", executor="ray"
    )
    with pytest.raises(UserError, match=r"pip install '\.\[ray\]'"):
        pipeline.pack(cfg)
    assert not (tmp_path / "o").exists()


def test_ray_executor_refuses_resume_and_stray_address(sample, tmp_path):
    corpus, tokenizer = sample
    common = {"inputs": (str(corpus),), "tokenizer": str(tokenizer), "out": tmp_path / "o"}
    with pytest.raises(UserError, match="--resume.*--executor ray"):
        pipeline.PackConfig(**common, executor="ray", resume=True)
    with pytest.raises(UserError, match="needs `--executor ray`"):
        pipeline.PackConfig(**common, ray_address="ray://head:10001")
    with pytest.raises(UserError, match="--executor 'spark' is unknown"):
        pipeline.PackConfig(**common, executor="spark")


def test_unreachable_ray_address_fails_fast():
    """`ray.init` would retry a dead address for minutes; a listening port (the control) passes."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        executor_ray._check_reachable(f"127.0.0.1:{port}")
        executor_ray._check_reachable(f"ray://127.0.0.1:{port}")
    with pytest.raises(UserError, match="no Ray cluster answers at '127.0.0.1:.*--ray-address"):
        executor_ray._check_reachable(f"127.0.0.1:{port}")  # closed now


@pytest.mark.slow
def test_task_refuses_an_input_or_tokenizer_this_node_sees_differently(inputs, tmp_path, monkeypatch):
    """A node without the shared storage (other bytes at the same path) is named, not silently packed."""
    # The task pins the Rust thread pool of its (Ray worker) process; keep this test process as it was.
    monkeypatch.setenv("RAYON_NUM_THREADS", os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count())))
    paths, tokenizer = inputs
    cfg = pipeline.PackConfig(inputs=tuple(paths), tokenizer=str(tokenizer), out=tmp_path, executor="ray")
    source = InputFile(Path(paths[0]), "jsonl")
    sha = load_tokenizer(str(tokenizer)).info.sha256
    part = str(tmp_path / "part.bin")
    good = executor_ray.tokenize_file(cfg, source, source.num_bytes, sha, part, 1)
    assert isinstance(good, executor_ray.FilePart) and good.num_records == 101  # the control
    other_size = executor_ray.tokenize_file(cfg, source, source.num_bytes + 1, sha, part, 1)
    assert isinstance(other_size, InputError) and "on this node but" in str(other_size)
    other_tokenizer = executor_ray.tokenize_file(cfg, source, source.num_bytes, "0" * 64, part, 1)
    assert isinstance(other_tokenizer, UserError) and "differs on this node" in str(other_tokenizer)


@pytest.mark.slow
def test_ray_executor_mixes_as_the_local_executor_does(ray_cluster, inputs, tmp_path):
    """A mixture (one source repeated, one cut; one with a blank and a malformed record) from both executors."""
    paths, _ = inputs
    sources = [f"big={paths[0]},{paths[2]},{paths[4]}:share=0.5", f"small={paths[3]},{paths[5]}:epochs=2"]
    mixed = [a for s in sources for a in ("--source", s)] + ["--max-epochs", "2"]
    files = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor / "out"
        args = [a for a in pack_args(inputs, out, "--executor", executor, *mixed) if a not in paths]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        files[executor] = folder_bytes(out)
    assert sorted(files["ray"]) == sorted(files["local"])
    assert [n for n in files["local"] if files["ray"][n] != files["local"][n]] == []
    mixture = Manifest.load(tmp_path / "ray" / "out").mixture
    assert mixture is not None and [s.name for s in mixture.sources] == ["big", "small"]
    assert mixture.sources[1].docs_repeated > 0 and mixture.sources[0].docs_left_out > 0
