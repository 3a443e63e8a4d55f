"""A run's recorded paths hold from any folder: `train eval --run`, `train export` and `train run --resume`
work from elsewhere than where the run started, for runs that record absolute paths and for old runs
that recorded them as given (relative)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import train.resume as resume
from prep.pipeline import PackConfig, pack
from shared.reader import PackedDataset
from train.checkpoint import list_checkpoints
from train.cli import app
from train.config import RunConfig
from train.loop import train
from train.model import load_base
from train.runinfo import RUN_JSON
from train.runpaths import absolute_config, resolve_config, start_folder

from .tiny import working_directory

runner = CliRunner()


def start_run(root: Path, name: str, *, old: bool, max_steps: int = 2) -> Path:
    """A LoRA run started in ``root`` with relative paths, as a user types them: `--data packed
    --model base --eval-data other=other --out runs/NAME`. ``old``: recorded as runs did before paths
    were made absolute (as given, and no start folder in run.json)."""
    cfg = RunConfig(
        data=Path("packed"), model="base", out=Path("runs") / name, max_steps=max_steps, save_every=1,
        eval_every=2, eval_data=(("other", Path("other")),), batch_size=2, lr=1e-2, device="cpu",
        attn="sdpa", lora_r=4, lora_alpha=8, tensorboard=False,
    )  # fmt: skip
    with working_directory(root), pytest.MonkeyPatch.context() as mp:
        if old:
            mp.setattr(resume, "absolute_config", lambda config, root=None: config)
        train(cfg, log=lambda _: None)
    out = root / "runs" / name
    if old:
        run_json = json.loads((out / RUN_JSON).read_text())
        for start in run_json["starts"]:
            start.pop("working_dir", None)
        (out / RUN_JSON).write_text(json.dumps(run_json))
    return out


@pytest.fixture(scope="module")
def project(sample, packed_sample, tmp_path_factory) -> Path:
    """A folder holding `packed` (part of the sample, packed there with `--tokenizer tok`, so its
    manifest names the tokenizer by a relative path), `other` (a second eval set), `base` (a model
    folder) and two runs started in it: `runs/new` (absolute paths) and `runs/old` (relative)."""
    corpus, tokenizer = sample
    root = tmp_path_factory.mktemp("project")
    (root / "tok").symlink_to(tokenizer)
    lines = corpus.read_text(encoding="utf-8").splitlines(True)[:60]
    (root / "part.jsonl").write_text("".join(lines), encoding="utf-8")
    with working_directory(root):
        pack(
            PackConfig(
                inputs=("part.jsonl",), tokenizer="tok", out=Path("packed"), seq_len=128, val_fraction=0.2
            )
        )
    (root / "other").symlink_to(packed_sample)
    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    load_base("tiny-qwen2", vocab_size=vocab_size, seed=0).save_pretrained(root / "base")
    start_run(root, "new", old=False)
    start_run(root, "old", old=True)
    return root


def recorded(run: Path) -> dict:
    return json.loads((list_checkpoints(run)[-1] / "state.json").read_text())["config"]


def test_a_run_records_absolute_paths_and_its_start_folder(project):
    new, old = recorded(project / "runs/new"), recorded(project / "runs/old")
    assert new["data"] == str(project / "packed") and new["model"] == str(project / "base")
    assert new["eval_data"] == [f"other={project / 'other'}"] and new["out"] == "runs/new"
    assert (old["data"], old["model"], old["eval_data"]) == ("packed", "base", ["other=other"])
    (start,) = json.loads((project / "runs/new" / RUN_JSON).read_text())["starts"]
    assert start["working_dir"] == str(project)


def test_the_run_s_eval_sets_are_shown_relative_to_where_the_user_stands(project):
    with working_directory(project / "runs"):
        result = runner.invoke(app, ["eval", "--run", "new", "--max-rows", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"eval sets of the run: val={project / 'packed'}, other={project / 'other'}" in result.output
    with working_directory(project):
        result = runner.invoke(app, ["eval", "--run", "runs/new", "--max-rows", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "eval sets of the run: val=packed, other=other" in result.output
    assert "val: packed (val split, 1 of" in result.output


def test_an_old_run_s_start_folder_is_found_from_its_recorded_out(project, tmp_path):
    old = recorded(project / "runs/old")
    assert start_folder(project / "runs/old", old) == project  # `runs/old` ends the run folder's path
    assert resolve_config(old, project / "runs/old")["eval_data"] == [f"other={project / 'other'}"]
    assert start_folder(project / "runs/old", {**old, "out": "elsewhere/old"}) == project / "runs"
    assert start_folder(project / "runs/new", {}) == project  # run.json's, whatever --out says
    assert absolute_config({"model": "tiny-qwen2", "data": "/a/b"}, tmp_path) == {
        "model": "tiny-qwen2",
        "data": "/a/b",
    }


@pytest.mark.parametrize("name", ["new", "old"])
def test_eval_and_export_of_a_run_from_another_folder(project, tmp_path, name):
    run = project / "runs" / name
    with working_directory(tmp_path):
        result = runner.invoke(app, ["eval", "--run", str(run), "--max-rows", "2", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert f"eval sets of the run: val={project / 'packed'}, other={project / 'other'}" in result.output
        # bits per byte: the manifest's `tok` is not found from here, the tokenizer the run's adapters carry is
        assert f"│ {name}/step-00000002 " in result.output and "bits/byte left out" not in result.output
        result = runner.invoke(app, ["export", str(run), "--merge", "--out", "merged"])
        assert result.exit_code == 0, result.output
    assert f"base       {project / 'base'}" in result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_moved_input_is_named_with_the_flag_that_replaces_it(project, tmp_path):
    root = tmp_path / "moved"
    shutil.copytree(project, root, symlinks=True)
    (root / "other").unlink()
    result = runner.invoke(app, ["eval", "--run", str(root / "runs/old"), "--device", "cpu"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert f"the run's eval set other=`{root / 'other'}` is not there" in message
    assert "--data other=PATH" in message
    shutil.rmtree(root / "base")
    result = runner.invoke(app, ["eval", "--run", str(root / "runs/old"), "--data", f"val={root / 'packed'}"])
    assert result.exit_code == 1
    assert f"the run's model `{root / 'base'}` is not there" in " ".join(result.output.split())
    result = runner.invoke(app, ["export", str(root / "runs/old"), "--merge", "--out", str(root / "m")])
    # export falls back to the base the adapter names (absolute: the original, still there)
    assert result.exit_code == 0 and f"base       {project / 'base'}" in result.output


@pytest.mark.parametrize("old", [False, True])
def test_resume_from_another_folder_with_paths_given_from_there(project, tmp_path, old):
    """Resumed from `sub/` with `--data ../packed --model ../base`: the same files as the run's
    relative `packed` and `base`, so the same run (another --model folder is refused)."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("packed", "other", "base"):
        (root / name).symlink_to(project / name)
    (root / "another").symlink_to(project / "base")
    out = start_run(root, "r", old=old, max_steps=3)
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    shutil.rmtree(out / "adapter")
    (root / "sub").mkdir()
    args = ["run", "--data", "../packed", "--model", "../base", "--out", "../runs/r", "--resume"]
    args += ["--max-steps", "3", "--save-every", "1", "--eval-every", "2", "--eval-data", "other=../other"]
    args += ["--batch-size", "2", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--device", "cpu"]
    args += ["--attn", "sdpa", "--no-tensorboard"]
    with working_directory(root / "sub"):
        refused = runner.invoke(app, [*[a if a != "../base" else "../another" for a in args]])
        result = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--model was" in refused.output
    assert result.exit_code == 0, result.output
    assert "resumed from ../runs/r/checkpoints/step-00000002 at step 2" in result.output
    assert recorded(out)["model"] == str(root / "base")
