"""`train run --resume` either runs what the checkpoint's run would have run, or refuses with every
difference listed; what it runs differently (logging, eval, device, ...) is recorded with its step."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from train.checkpoint import CheckpointError, load_checkpoint
from train.cli import app
from train.config import RunConfig
from train.loop import train
from train.model import LoraSettings, load_model
from train.outputs import read_metrics
from train.resume import APPLIED_ON_RESUME, FIXED_ON_RESUME, NOT_COMPARED

runner = CliRunner()
LR = 3e-3
OPTIONS = ["--model", "tiny-qwen2", "--batch-size", "2", "--lora-alpha", "16", "--device", "cpu"]
OPTIONS += ["--attn", "sdpa", "--eval-every", "0"]


def config(data: Path, out: Path, **kw) -> RunConfig:
    base = {"model": "tiny-qwen2", "batch_size": 2, "lora_r": 8, "lora_alpha": 16, "lr": LR}
    base |= {"device": "cpu", "attn": "sdpa", "eval_every": 0, "max_steps": 4}
    return RunConfig(data=data, out=out, **{**base, **kw})


@pytest.fixture(scope="module")
def stopped_run(packed_sample, tmp_path_factory) -> Path:
    """A 4-step run (lr 3e-3, LoRA r 8) stopped after its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("resume") / "run"
    train(config(packed_sample, out, save_every=2), log=lambda _: None)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "adapter")
    return out


@pytest.fixture
def run_copy(stopped_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out


def resume_cli(data: Path, out: Path, *flags: str, length: tuple[str, ...] = ("--max-steps", "4")):
    args = ["run", "--data", str(data), "--out", str(out), "--resume", *OPTIONS, *length, *flags]
    return runner.invoke(app, args)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_every_option_is_either_fixed_or_applied_on_resume():
    """A new option of `train run` must be classified before resume can take it."""
    groups = (FIXED_ON_RESUME, APPLIED_ON_RESUME, NOT_COMPARED)
    classified = [name for group in groups for name in group]
    assert len(classified) == len(set(classified))
    assert set(classified) == {f.name for f in dataclasses.fields(RunConfig)}


def test_another_lora_rank_is_refused_before_loading_and_nothing_changes(packed_sample, run_copy):
    before = snapshot(run_copy)
    result = resume_cli(packed_sample, run_copy, "--lora-r", "4", "--lr", str(LR))
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert f"cannot resume `{run_copy}` from step-00000002: --lora-r was 8 in the checkpoint, now 4." in (
        " ".join(result.output.split())
    )
    assert "resume with --lora-r 8" in result.output
    assert snapshot(run_copy) == before


def test_the_adapter_loader_refuses_another_rank_without_a_traceback(stopped_run, packed_sample):
    """The backstop for a checkpoint whose options are unknown: shapes are compared when loading."""
    from shared.reader import PackedDataset

    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    for r, fits in ((4, False), (8, True)):  # negative control: the same rank loads
        model = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa", lora=LoraSettings(r=r, alpha=16))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        path = stopped_run / "checkpoints" / "step-00000002"
        if fits:
            load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
        else:
            with pytest.raises(CheckpointError, match=r"its adapter does not fit this model \(size mismatch"):
                load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)


def test_new_lr_and_weight_decay_are_refused_in_one_message(packed_sample, run_copy):
    before = snapshot(run_copy)
    result = resume_cli(packed_sample, run_copy, "--lora-r", "8", "--lr", "1e-2", "--weight-decay", "0.1")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert (
        f"--lr was {LR} in the checkpoint, now 0.01; --weight-decay was 0.0 in the checkpoint, now 0.1."
        in (message)
    )
    assert f"resume with --lr {LR} --weight-decay 0.0." in message
    assert snapshot(run_copy) == before  # nothing trained, nothing recorded


def test_run_length_change_is_listed_with_the_flag_to_drop(packed_sample, run_copy):
    result = resume_cli(
        packed_sample, run_copy, "--lora-r", "8", "--lr", str(LR), length=("--token-budget", "4096")
    )
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "--token-budget was not given in the checkpoint, now 4096" in message
    assert "--max-steps was 4 in the checkpoint, now not given" in message
    assert "resume with --max-steps 4 without --token-budget." in message


def recorded_vs_ran(checkpoint: Path) -> dict[str, tuple]:
    """(recorded in the config, used by the optimizer) for lr and weight decay."""
    state = json.loads((checkpoint / "state.json").read_text())
    groups = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    return {
        "lr": (state["config"]["lr"], state["scheduler"]["base_lrs"][0], groups[0]["initial_lr"]),
        "weight_decay": (state["config"]["weight_decay"], groups[0]["weight_decay"]),
    }


@pytest.mark.slow
def test_an_applied_change_is_recorded_with_its_step_and_the_record_says_what_ran(packed_sample, run_copy):
    resumed = train(config(packed_sample, run_copy, eval_every=1, resume=True), log=lambda _: None)
    assert sorted(resumed.losses) == [3, 4] and sorted(resumed.eval_losses) == [3, 4]
    records = read_metrics(run_copy / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r for r in records if "resumed_from" in r] == [
        {
            "step": 2,
            "kind": "resume",
            "resumed_from": "step-00000002",
            "changed": {"eval_every": [0, 1], "save_every": [2, 0]},
        }
    ]
    state = json.loads((run_copy / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["resumes"] == [
        {"step": 2, "checkpoint": "step-00000002", "changed": {"eval_every": [0, 1], "save_every": [2, 0]}}
    ]
    ran = recorded_vs_ran(run_copy / "checkpoints" / "step-00000004")
    assert all(len(set(values)) == 1 for values in ran.values()), ran
    assert ran["lr"][0] == LR


def test_the_record_check_catches_a_config_that_was_not_what_ran(stopped_run, tmp_path):
    """Negative control: a checkpoint that records a new lr it never ran (the old behaviour)."""
    checkpoint = tmp_path / "step-00000002"
    shutil.copytree(stopped_run / "checkpoints" / "step-00000002", checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    state["config"]["lr"] = 1e-2
    (checkpoint / "state.json").write_text(json.dumps(state))
    ran = recorded_vs_ran(checkpoint)
    assert len(set(ran["lr"])) == 2 and ran["lr"][0] == 1e-2
