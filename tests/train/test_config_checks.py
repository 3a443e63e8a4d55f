"""Config that cannot lie: TOML values of the wrong type fail naming the key; a finished run is not
"resumed"; a new stage starts from a trained adapter (`--init-adapter`); `--keep-checkpoints N`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from train.checkpoint import CheckpointError, list_checkpoints
from train.cli import app
from train.config import ConfigError, RunConfig, build_run_config, field_types
from train.eval import evaluate_split
from train.loop import setup, train

runner = CliRunner()


def tiny(data: Path, out: Path, **options) -> RunConfig:
    base = {"model": "tiny-qwen2", "batch_size": 2, "lr": 3e-3, "warmup_ratio": 0.1, "eval_every": 0}
    base |= {"device": "cpu", "attn": "sdpa", "lora_r": 8, "lora_alpha": 16, "max_steps": 4}
    return RunConfig(data=data, out=out, **{**base, **options})


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'batch-size = "8"',
            "`batch-size` must be an integer, not str '8'. Write it without quotes: `batch-size = 8`",
        ),
        ("max-steps = 2.5", "`max-steps` must be an integer, not float 2.5. Give a whole number."),
        ('lora = "no"', "`lora` must be true or false, not str 'no'. Write `lora = true` or `lora = false`"),
        ("no-lora = 1", "`no-lora` must be true or false, not int 1."),
        ('lr = "2e-4"', "`lr` must be a number, not str '2e-4'. Write it without quotes: `lr = 2e-4`"),
        ("grad-checkpointing = 0", "`grad-checkpointing` must be true or false, not int 0."),
        ("eval-data = 3", '`eval-data` is 3; give a list of "NAME=PATH" strings'),
        ("attn = 1", "`attn` must be a string, not int 1."),
    ],
)
def test_a_toml_value_of_the_wrong_type_fails_naming_the_key(packed_sample, tmp_path, line, message):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{packed_sample}"\nmodel = "tiny-qwen2"\nout = "{tmp_path / "r"}"\n{line}\n')
    result = runner.invoke(app, ["run", "--config", str(toml), "--max-steps", "1"])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_well_typed_toml_values_pass_and_an_integer_is_a_number():
    kinds = field_types()
    assert (kinds["batch_size"], kinds["max_steps"], kinds["lr"], kinds["lora"]) == (int, int, float, bool)
    assert kinds["init_adapter"] is Path and kinds["data"] is Path


def test_an_integer_lr_reads_as_a_float(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "d"\nmodel = "tiny-qwen2"\nout = "o"\nmax-steps = 3\nlr = 1\nno-lora = true\n')
    cfg = build_run_config(toml, {})
    assert (cfg.lr, type(cfg.lr), cfg.lora, cfg.data) == (1.0, float, False, Path("d"))


def test_new_options_are_checked(packed_sample, tmp_path):
    with pytest.raises(ConfigError, match="--dtype fp16 is not supported: .* GradScaler"):
        tiny(packed_sample, tmp_path, dtype="fp16")
    with pytest.raises(ConfigError, match="--keep-checkpoints -1 must not be negative"):
        tiny(packed_sample, tmp_path, keep_checkpoints=-1)
    with pytest.raises(ConfigError, match="--init-adapter loads a LoRA adapter, but .*--no-lora"):
        tiny(packed_sample, tmp_path, init_adapter=tmp_path, lora=False)


@pytest.fixture(scope="module")
def finished_run(packed_sample, tmp_path_factory):
    """A finished 4-step LoRA run, evaluated on the val split at its last step."""
    out = tmp_path_factory.mktemp("stage") / "r1"
    result = train(tiny(packed_sample, out, eval_every=4), log=quiet)
    return out, result.eval_losses[4]


def _eval_at_start(cfg: RunConfig) -> tuple[float, dict]:
    run = setup(cfg, quiet)
    try:
        split = run.eval_sets["val"]
        loss = evaluate_split(run.model, split, batch_size=cfg.batch_size, device=run.device).loss
        return loss, run.optimizer.state_dict()["state"]
    finally:
        run.close()


@pytest.mark.slow
def test_init_adapter_starts_from_the_trained_weights_with_a_fresh_optimizer(
    packed_sample, tmp_path, finished_run
):
    source, final_eval = finished_run
    for given in (source / "adapter", source, source / "checkpoints" / "step-00000004"):
        loss, optimizer_state = _eval_at_start(tiny(packed_sample, tmp_path / given.name, init_adapter=given))
        assert loss == pytest.approx(final_eval, rel=1e-6, abs=0.0), given
        assert optimizer_state == {}
    # the control: the same run without the adapter starts from the untrained model
    untrained, _ = _eval_at_start(tiny(packed_sample, tmp_path / "fresh"))
    assert abs(untrained - final_eval) > 1e-3


def test_init_adapter_of_another_rank_or_no_adapter_is_refused(packed_sample, tmp_path, finished_run):
    source, _ = finished_run
    with pytest.raises(
        CheckpointError, match="has LoRA r 8 and alpha 16, this run --lora-r 4 --lora-alpha 16"
    ):
        setup(tiny(packed_sample, tmp_path / "a", init_adapter=source / "adapter", lora_r=4), quiet)
    with pytest.raises(CheckpointError, match="holds no LoRA adapter"):
        setup(tiny(packed_sample, tmp_path / "b", init_adapter=tmp_path), quiet)


def test_a_finished_run_is_not_resumed_and_the_message_says_how_to_train_further(
    packed_sample, tmp_path, finished_run
):
    source, _ = finished_run
    out = tmp_path / "r1"
    shutil.copytree(source, out)
    args = ["run", "--data", str(packed_sample), "--out", str(out), "--resume", "--model", "tiny-qwen2"]
    args += [
        "--batch-size",
        "2",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lr",
        "3e-3",
        "--warmup-ratio",
        "0.1",
    ]
    args += ["--device", "cpu", "--attn", "sdpa"]
    same = runner.invoke(app, [*args, "--max-steps", "4"])
    assert same.exit_code == 1
    message = " ".join(same.output.split())
    assert "finished: its newest checkpoint step-00000004 is its last step" in message
    assert f"--init-adapter {out / 'adapter'} --max-steps N" in message.replace("`", "")
    longer = runner.invoke(app, [*args, "--max-steps", "8"])
    message = " ".join(longer.output.split())
    assert "--max-steps was 4 in the checkpoint, now 8" in message and "This run finished." in message


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_newest_and_never_the_one_resumed_from(packed_sample, tmp_path):
    out = tmp_path / "r"
    train(tiny(packed_sample, out, max_steps=5, save_every=1, keep_checkpoints=2), log=quiet)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004", "step-00000005"]
    assert not list((out / "checkpoints").glob(".*"))  # nothing half-deleted left behind

    out = tmp_path / "resumed"
    train(tiny(packed_sample, out, max_steps=4, save_every=2), log=quiet)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "adapter")
    train(tiny(packed_sample, out, max_steps=4, save_every=1, keep_checkpoints=1, resume=True), log=quiet)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]


def test_dtype_and_grad_checkpointing_reach_the_model_and_the_log(packed_sample, tmp_path):
    lines = []
    run = setup(tiny(packed_sample, tmp_path / "r", dtype="bf16", grad_checkpointing=True), lines.append)
    try:
        frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
        assert frozen == {torch.bfloat16}
    finally:
        run.close()
    device_line = next(line for line in lines if line.startswith("device "))
    assert "--device cpu (asked for) | torch" in device_line
    dtype_line = next(line for line in lines if line.startswith("dtype "))
    assert "weights bfloat16" in dtype_line
    assert dtype_line.endswith("compute bfloat16 | grad checkpointing on")


def test_array_fields_check_each_item():
    """For options other helpers may add as repeatable flags (`tuple[str, ...]` fields)."""
    from train.config import typed_value

    assert typed_value("eval-data", ["a=x", "b=y"], tuple[str, ...], "f") == ("a=x", "b=y")
    with pytest.raises(ConfigError, match=r"`eval-data\[1\]` must be a string, not int 2"):
        typed_value("eval-data", ["a=x", 2], tuple[str, ...], "f")
    with pytest.raises(ConfigError, match=r"`eval-data` must be an array"):
        typed_value("eval-data", "a=x", tuple[str, ...], "f")
