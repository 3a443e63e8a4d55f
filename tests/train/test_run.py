"""`train run` end to end on the sample: it learns, normalises the loss over all targets of a step,
does not depend on how a step is split into micro-batches, and resumes to the same losses."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shared.errors import DatasetError
from shared.reader import PackedDataset
from train.cli import app
from train.config import ConfigError, RunConfig, build_run_config
from train.loader import Loader, batch_from_rows
from train.loop import train
from train.loss import micro_batch_loss_sum
from train.model import LoraSettings, load_model

runner = CliRunner()


def tiny(data: Path, out: Path, **options) -> RunConfig:
    base = {
        "model": "tiny-qwen2",
        "batch_size": 2,
        "lr": 3e-3,
        "warmup_ratio": 0.1,
        "eval_every": 0,
        "device": "cpu",
        "attn": "sdpa",
        "lora_r": 8,
        "lora_alpha": 16,
    }
    return RunConfig(data=data, out=out, **{**base, **options})


def quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_run_cli_learns_on_the_sample(packed_sample, tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        "--data",
        str(packed_sample),
        "--model",
        "tiny-qwen2",
        "--out",
        str(out),
        "--max-steps",
        "30",
    ]
    args += ["--batch-size", "2", "--lr", "1e-2", "--eval-every", "15", "--device", "cpu", "--attn", "sdpa"]
    args += ["--lora-r", "8", "--lora-alpha", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    step_lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 30
    fields = [part.split()[0] for part in step_lines[-1].split(" | ")]
    assert fields == ["step", "loss", "lr", "targets", "tok/s", "mem", "eta"]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 30 and len(evals) == 3  # steps 0, 15 and 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # ln(639) = 6.5 at random init; it must learn a lot
    assert evals[-1] < losses[0] - 1.0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the exported adapter is a plain peft adapter: peft loads it onto the base model
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    from train.model import tiny_qwen2_config

    base = Qwen2ForCausalLM(tiny_qwen2_config(PackedDataset(packed_sample).manifest.tokenizer.vocab_size))
    loaded = PeftModel.from_pretrained(base, out / "adapter")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # trained, not the zero init
    assert len(saved) == sum(1 for n, _ in loaded.named_parameters() if "lora_" in n)


def first_step_batches(split, seed: int) -> list:
    loader = Loader(split, batch_size=1, grad_accum=2, seed=seed)
    return [batch_from_rows([split.row(int(i)) for i in loader.batch_rows(0, k)]) for k in (0, 1)]


def test_step_loss_is_over_all_target_tokens_not_a_mean_of_micro_batch_means(packed_sample, tmp_path):
    dataset = PackedDataset(packed_sample)
    split = dataset.split("train")
    # Most packed rows are full; pick a seed whose first step pairs rows with different target counts,
    # where a mean of per-micro-batch means would weigh tokens unequally.
    seed = next(
        s for s in range(100) if len({b.num_target_tokens for b in first_step_batches(split, s)}) == 2
    )
    batches = first_step_batches(split, seed)
    result = train(
        tiny(packed_sample, tmp_path / "r", batch_size=1, grad_accum=2, max_steps=1, seed=seed), log=quiet
    )

    # recompute step 1 by hand, with the same initial model and the same two rows
    model = load_model(
        "tiny-qwen2",
        vocab_size=dataset.manifest.tokenizer.vocab_size,
        attn="sdpa",
        lora=LoraSettings(r=8, alpha=16),
        seed=seed,
    )
    with torch.no_grad():
        sums = [float(micro_batch_loss_sum(model, b)) for b in batches]
    counts = [b.num_target_tokens for b in batches]
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / n for s, n in zip(sums, counts, strict=True)) / 2
    assert result.losses[1] == pytest.approx(token_mean, rel=1e-6)
    # negative control: the per-micro-batch average is measurably different on these rows
    assert abs(mean_of_means - token_mean) > 1e-4


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_one_micro_batch_of_two_rows_equals_two_of_one_row(packed_sample, tmp_path):
    one_by_two = train(
        tiny(packed_sample, tmp_path / "a", batch_size=1, grad_accum=2, max_steps=3), log=quiet
    )
    two_by_one = train(
        tiny(packed_sample, tmp_path / "b", batch_size=2, grad_accum=1, max_steps=3), log=quiet
    )
    for step in (1, 2, 3):
        assert one_by_two.losses[step] == pytest.approx(two_by_one.losses[step], rel=1e-5, abs=1e-6)
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    # negative control: a different split of the data (another seed) gives another update
    other = train(tiny(packed_sample, tmp_path / "c", batch_size=2, max_steps=3, seed=1), log=quiet)
    assert other.losses[3] != pytest.approx(two_by_one.losses[3], rel=1e-3)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(packed_sample, tmp_path):
    full = tmp_path / "full"
    uninterrupted = train(tiny(packed_sample, full, max_steps=6, save_every=3, eval_every=3), log=quiet)

    # the same run killed after its step-3 checkpoint (and after logging steps 4-5)
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "step-00000006")
    shutil.rmtree(killed / "adapter")
    metrics = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(m + "\n" for m in metrics if json.loads(m)["step"] <= 5))

    resumed = train(
        tiny(packed_sample, killed, max_steps=6, save_every=3, eval_every=3, resume=True), log=quiet
    )
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(uninterrupted.losses[step], rel=0, abs=1e-6)
    assert resumed.eval_losses[6] == pytest.approx(uninterrupted.eval_losses[6], abs=1e-6)
    records = [json.loads(m) for m in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "resumed_from" not in r] == [
        json.loads(m)["step"] for m in (full / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r for r in records if "resumed_from" in r] == [
        {"step": 3, "kind": "resume", "resumed_from": "step-00000003", "changed": {}}
    ]
    a, b = adapter_weights(full), adapter_weights(killed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_another_run_length(packed_sample, tmp_path):
    out = tmp_path / "r"
    train(tiny(packed_sample, out, max_steps=2), log=quiet)
    result = runner.invoke(
        app,
        ["run", "--data", str(packed_sample), "--model", "tiny-qwen2", "--out", str(out), "--max-steps", "5"]
        + ["--batch-size", "2", "--lora-r", "8", "--lora-alpha", "16", "--device", "cpu", "--resume"]
        + ["--lr", "3e-3", "--warmup-ratio", "0.1"],
    )
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "from step-00000002: --max-steps was 2 in the checkpoint, now 5." in message
    assert "resume with --max-steps 2." in message


def test_config_file_with_flag_overrides(packed_sample, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'data = "{packed_sample}"\nmodel = "tiny-qwen2"\nout = "{tmp_path}"\nbatch-size = 4\nmax_steps = 9\nno-lora = true\n'
    )
    cfg = build_run_config(toml, {"batch_size": 2, "lr": None})
    assert (cfg.batch_size, cfg.max_steps, cfg.lora, cfg.data) == (2, 9, False, packed_sample)
    # through the CLI, as a user runs it: the flag wins over the file, the file over the defaults
    result = runner.invoke(app, ["run", "--config", str(toml), "--max-steps", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "batch 4 rows" in result.output and re.search(r"^steps +1$", result.output, re.M)
    assert (tmp_path / "model" / "model.safetensors").exists()  # no-lora: the whole model is exported
    toml.write_text(toml.read_text() + "bacth_size = 3\n")
    with pytest.raises(ConfigError, match="unknown option `bacth_size`"):
        build_run_config(toml, {})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0", "--max-steps", "3"], "--batch-size 0 must be at least 1"),
        (["--max-steps", "3", "--token-budget", "100"], "exactly one of `--token-budget` and `--max-steps`"),
        (["--max-steps", "3", "--attn", "xformers"], "--attn 'xformers' is unknown"),
        (["--max-steps", "3", "--device", "cuda:x"], "--device 'cuda:x' is unknown"),
    ],
)
def test_bad_options_name_the_flag(packed_sample, tmp_path, flags, message):
    args = ["run", "--data", str(packed_sample), "--model", "tiny-qwen2", "--out", str(tmp_path)]
    result = runner.invoke(app, args + flags)
    assert result.exit_code == 1
    assert message in result.output


@pytest.mark.slow
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_work(packed_sample, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    args = [
        "run",
        "--data",
        str(packed_sample),
        "--model",
        "tiny-qwen2",
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]
    for out, message in (
        (file, f"--out `{file}` is a file; pass a folder"),
        (file / "run", f"--out `{file / 'run'}` cannot be created (Not a directory); pass a folder"),
    ):
        result = runner.invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 1
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert message in " ".join(result.output.split()), result.output
    assert file.read_text() == "mine\n"
    # negative control: a folder that does not exist yet is created
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "new" / "run"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output


def test_model_vocab_must_cover_the_tokenizer(packed_sample, tmp_path):
    from transformers import Qwen2ForCausalLM

    from train.model import tiny_qwen2_config

    small = tmp_path / "small-model"
    Qwen2ForCausalLM(tiny_qwen2_config(100)).save_pretrained(small)
    result = runner.invoke(
        app,
        ["run", "--data", str(packed_sample), "--model", str(small), "--out", str(tmp_path / "r")]
        + ["--max-steps", "1", "--device", "cpu"],
    )
    assert result.exit_code == 1
    assert "100" in result.output and "tokens" in result.output


def _rank_main(rank: int, world_size: int, port: int, cfg: RunConfig, result_file: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = train(cfg, log=quiet)
        if rank == 0:
            result_file.write_text(json.dumps({"losses": result.losses, "eval": result.eval_losses}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_twice_the_micro_batches(packed_sample, tmp_path):
    """gloo on CPU: 2 ranks x 1 micro-batch per step == 1 rank x 2 micro-batches (same rows, same loss)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"max_steps": 3, "eval_every": 3, "batch_size": 1}
    result_file = tmp_path / "ddp.json"
    cfg = tiny(packed_sample, tmp_path / "ddp", **options)
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers)
    mp.start_processes(_rank_main, args=(2, port, cfg, result_file), nprocs=2, start_method="fork")
    ddp = json.loads(result_file.read_text())
    single = train(tiny(packed_sample, tmp_path / "one", grad_accum=2, **options), log=quiet)
    for step in (1, 2, 3):
        assert ddp["losses"][str(step)] == pytest.approx(single.losses[step], rel=1e-5, abs=1e-6)
    assert ddp["eval"]["3"] == pytest.approx(single.eval_losses[3], rel=1e-5)
    a, b = adapter_weights(tmp_path / "ddp"), adapter_weights(tmp_path / "one")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_data_must_share_the_tokenizer(packed_sample, tmp_path):
    from train.loop import open_data

    same = tiny(packed_sample, tmp_path / "r", max_steps=1, eval_data=(("again", packed_sample),))
    assert {name: split.name for name, split in open_data(same)[2].items()} == {"val": "val", "again": "val"}
    other = tmp_path / "other"
    shutil.copytree(packed_sample, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="another tokenizer"):
        open_data(tiny(packed_sample, tmp_path / "r", max_steps=1, eval_data=(("other", other),)))
