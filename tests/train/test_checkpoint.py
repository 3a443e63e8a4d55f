"""Checkpoints: complete or absent (even when killed), verified before use, refused when damaged."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from train import checkpoint as ckpt
from train.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from train.cli import app
from train.config import RunConfig
from train.loop import train
from train.outputs import read_metrics

runner = CliRunner()
OPTIONS = ["--model", "tiny-qwen2", "--batch-size", "2", "--lora-r", "8", "--lora-alpha", "16"]
OPTIONS += ["--device", "cpu", "--attn", "sdpa", "--eval-every", "0"]


def config(data: Path, out: Path, **kw) -> RunConfig:
    base = {
        "model": "tiny-qwen2",
        "batch_size": 2,
        "lora_r": 8,
        "lora_alpha": 16,
        "device": "cpu",
        "eval_every": 0,
    }
    return RunConfig(data=data, out=out, **{**base, **kw})


@pytest.fixture(scope="module")
def finished_run(packed_sample, tmp_path_factory) -> Path:
    """A 6-step run killed after its step-4 checkpoint: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(config(packed_sample, out, max_steps=6, save_every=2), log=lambda _: None)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def resume(data: Path, out: Path, steps: int = 6):
    args = ["run", "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--resume"]
    return runner.invoke(app, args + OPTIONS)


def test_checkpoint_lists_and_verifies_every_file(finished_run):
    path = latest_checkpoint(finished_run)
    assert path.name == "step-00000004"
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) >= {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "optimizer.pt",
        "rng.safetensors",
        "state.json",
    }
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 4
    assert (state["loader"]["epoch"], state["loader"]["batch_in_epoch"]) == (0, 4)
    assert state["scheduler"]["last_epoch"] == 4


def test_truncated_file_is_refused_with_the_fix(packed_sample, run_copy):
    target = run_copy / "checkpoints" / "step-00000004" / "optimizer.pt"
    target.write_bytes(target.read_bytes()[:-100])
    result = resume(packed_sample, run_copy)
    assert result.exit_code == 1
    assert "`optimizer.pt` has" in result.output and "truncated" in result.output
    assert "resume from the previous checkpoint `step-00000002`" in result.output


def test_flipped_byte_is_refused(packed_sample, run_copy):
    target = run_copy / "checkpoints" / "step-00000004" / "adapter" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors` is corrupted"):
        verify_checkpoint(target.parent.parent)
    assert resume(packed_sample, run_copy).exit_code == 1


def test_missing_manifest_means_incomplete(run_copy):
    (run_copy / "checkpoints" / "step-00000004" / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(latest_checkpoint(run_copy))


class NotATensor:
    """Stands in for any object a pickle could smuggle into a checkpoint."""


def test_optimizer_file_is_never_unpickled_beyond_tensors(packed_sample, run_copy):
    path = run_copy / "checkpoints" / "step-00000004"
    torch.save({"state": {}, "param_groups": [], "payload": NotATensor()}, path / "optimizer.pt")
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest["files"]["optimizer.pt"] = {
        "bytes": (path / "optimizer.pt").stat().st_size,
        "sha256": ckpt.sha256_file(path / "optimizer.pt"),
    }
    (path / "checkpoint.json").write_text(json.dumps(manifest))
    verify_checkpoint(path)  # the checksums agree: only the loader's weights_only stands in the way
    result = resume(packed_sample, run_copy)
    assert result.exit_code == 1
    assert "refusing to unpickle" in result.output


def test_failed_save_leaves_no_checkpoint_behind(packed_sample, run_copy, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(CheckpointError) as failed:
        train(config(packed_sample, run_copy, max_steps=6, save_every=2, resume=True), log=lambda _: None)
    assert str(failed.value) == (
        f"cannot write checkpoint `{run_copy / 'checkpoints' / 'step-00000006'}` (disk full); nothing of it"
        " was kept. Free space or fix the folder, then run again with --resume: it continues from"
        " `step-00000004`."
    )
    names = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]  # step 6 never appeared, no temp folder left
    verify_checkpoint(latest_checkpoint(run_copy))


@pytest.mark.slow
def test_leftover_temp_folder_is_ignored_and_cleaned(packed_sample, run_copy):
    stale = run_copy / "checkpoints" / ".step-00000006.tmp-99999"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")
    assert latest_checkpoint(run_copy).name == "step-00000004"
    train(config(packed_sample, run_copy, max_steps=6, save_every=2, resume=True), log=lambda _: None)
    assert not stale.exists()
    assert latest_checkpoint(run_copy).name == "step-00000006"


def _train_quietly(cfg: RunConfig) -> None:
    torch.set_num_threads(1)
    train(cfg, log=lambda _: None)


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_complete_checkpoint(packed_sample, tmp_path):
    """SIGKILL a run that checkpoints every step, at whatever point it has reached, then resume.

    The run is a forked child (it inherits the imported modules; a fresh `train run` process spends
    most of its time importing), killed as soon as its third checkpoint exists: often while it is
    writing the fourth."""
    out = tmp_path / "run"
    steps = 8
    child = multiprocessing.get_context("fork").Process(
        target=_train_quietly, args=(config(packed_sample, out, max_steps=steps, save_every=1),)
    )
    child.start()
    deadline = time.monotonic() + 120
    try:
        while not (out / "checkpoints" / "step-00000003").exists():
            assert child.is_alive(), "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    last = latest_checkpoint(out)
    verify_checkpoint(last)
    done = int(last.name.split("-")[1])
    assert 3 <= done < steps
    result = train(config(packed_sample, out, max_steps=steps, resume=True), log=lambda _: None)
    assert sorted(result.losses) == list(range(done + 1, steps + 1))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    assert [(r["step"], r["resumed_from"]) for r in records if "resumed_from" in r] == [(done, last.name)]


def test_resume_on_other_data_is_refused(packed_sample, run_copy, tmp_path):
    other = tmp_path / "other-data"
    shutil.copytree(packed_sample, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "f" * 64  # as if a shard had been re-packed
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = resume(other, run_copy)
    assert result.exit_code == 1
    assert "checksum mismatch" in result.output  # --verify checksum (default) catches it first
    result = runner.invoke(
        app,
        ["run", "--data", str(other), "--out", str(run_copy), "--max-steps", "6", "--resume"]
        + ["--verify", "size", *OPTIONS],
    )
    assert result.exit_code == 1
    assert "was trained on other data" in result.output
