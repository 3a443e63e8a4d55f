"""What a run says about itself: the header (device, dtypes, attention and why, trainable parameters,
plan), a warning for a GPU run on the per-segment reference, tokens/s, ETA and MFU per step, and the
same figures in metrics.jsonl, run.json, TensorBoard, a (fake) W&B run and loss.png."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import train.attention as attention
import train.loop as loop
import train.runinfo as runinfo
import train.throughput as throughput
from shared.errors import UserError
from shared.reader import PackedDataset
from train.config import RunConfig
from train.loop import train
from train.model import LoraSettings, causal_lm, load_model
from train.outputs import loss_curves, plot_losses, read_metrics, record_kind
from train.plan import make_plan
from train.runinfo import describe_run, header_lines, read_run_json, step_line, warning_lines
from train.sinks import open_sinks, scalars_of
from train.throughput import Pace, format_duration, mean_causal_context, peak_flops, train_flops_per_token

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(data: Path, out: Path, **kw) -> RunConfig:
    base = {"model": "tiny-qwen2", "batch_size": 2, "lora_r": 8, "lora_alpha": 16, "lr": 3e-3}
    base |= {"device": "cpu", "attn": "sdpa", "eval_every": 2, "save_every": 2, "max_steps": 4}
    return RunConfig(data=data, out=out, **{**base, **kw})


class FakeWandbRun:
    def __init__(self, **init_kwargs) -> None:
        self.init_kwargs = init_kwargs
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finished = False

    def log(self, data: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(data)))

    def finish(self) -> None:
        self.finished = True


def fake_wandb_module(runs: list[FakeWandbRun]) -> types.ModuleType:
    module = types.ModuleType("wandb")

    def init(**kwargs):
        runs.append(FakeWandbRun(**kwargs))
        return runs[-1]

    module.init = init  # type: ignore[attr-defined]
    return module


@pytest.fixture(scope="module")
def watched_run(packed_sample, tmp_path_factory):
    """A 4-step LoRA run (checkpoint and eval every 2 steps) with a fake W&B, and TensorBoard when
    installed (the default)."""
    out = tmp_path_factory.mktemp("observe") / "run"
    lines: list[str] = []
    runs: list[FakeWandbRun] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake_wandb_module(runs))
        result = train(config(packed_sample, out, wandb=True), log=lines.append)
    return types.SimpleNamespace(out=out, lines=lines, wandb=runs, result=result)


def test_the_header_names_device_dtype_backend_and_why_model_and_trainable_parameters(
    watched_run, packed_sample
):
    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    model = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa", lora=LoraSettings(r=8, alpha=16))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    head = {line.split()[0]: line for line in watched_run.lines[:6]}
    assert list(head) == ["device", "dtype", "attention", "model", "trainable", "tokens"]
    assert (
        head["device"].startswith("device           cpu (")
        and ", --device cpu (asked for) | torch" in head["device"]
    )
    assert head["dtype"] == (
        "dtype            weights float32, trainable float32, compute float32 | grad checkpointing off"
    )
    assert head["attention"] == "attention        sdpa (requested with --attn sdpa)"
    targets = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    assert head["model"] == f"model            tiny-qwen2 (qwen2, 2 layers) | LoRA r 8, alpha 16 on {targets}"
    assert head["trainable"] == (
        f"trainable        {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
    )
    assert any(line.startswith("steps ") and line.split()[-1] == "4" for line in watched_run.lines[:12])
    assert not any(line.startswith("warning") for line in watched_run.lines)  # CPU: no GPU fallback
    assert not any("mfu" in line for line in watched_run.lines)  # no MFU on the CPU

    (start,) = read_run_json(watched_run.out)
    assert start["attn"] == {
        "requested": "sdpa",
        "backend": "sdpa",
        "device_type": "cpu",
        "reason": "requested with --attn sdpa",
    }
    assert (start["num_trainable"], start["num_params"], start["start_step"]) == (trainable, total, 0)
    assert start["lora_targets"] == targets.split(", ")
    assert (start["num_steps"], start["tokens_per_step"], start["peak_flops"]) == (4, 2 * 128, None)


def test_step_lines_give_tokens_per_second_eta_and_memory(watched_run):
    steps = [line for line in watched_run.lines if line.startswith("step ")]
    assert len(steps) == 4
    for line in steps:
        fields = dict(part.split(" ", 1) for part in line.split(" | "))
        assert list(fields) == ["step", "loss", "lr", "targets", "tok/s", "mem", "eta"]
        assert float(fields["tok/s"].replace(",", "")) > 0
    records = [json.loads(line) for line in (watched_run.out / "metrics.jsonl").read_text().splitlines()]
    eta = [r["eta_s"] for r in records if r["kind"] == "train"]
    assert eta[-1] < eta[0]  # after the last step, only its evaluation is left


def test_metrics_records_say_their_kind_and_old_files_still_read(watched_run, tmp_path):
    records = read_metrics(watched_run.out / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in records] == [
        (0, "eval"),
        (1, "train"),
        (2, "train"),
        (2, "eval"),
        (3, "train"),
        (4, "train"),
        (4, "eval"),
    ]
    assert all({"loss", "lr", "tok_per_s", "eta_s"} <= r.keys() for r in records if r["kind"] == "train")
    assert "mfu" not in records[1]  # CPU
    # a metrics.jsonl written before records had a kind: the same kinds are read from the fields
    old = [{k: v for k, v in r.items() if k != "kind"} for r in records]
    assert [record_kind(r) for r in old] == [r["kind"] for r in records]
    assert record_kind({"step": 2, "resumed_from": "step-00000002", "changed": {}}) == "resume"
    old_file = tmp_path / "metrics.jsonl"
    old_file.write_text("".join(json.dumps(r) + "\n" for r in old))
    plot_losses(old_file, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_loss_curves_split_named_eval_sets_and_read_old_records():
    records = [
        {"step": 1, "loss": 3.0, "lr": 1e-3},  # written before records had a kind
        {"step": 1, "eval_loss": 3.5},
        {"step": 2, "kind": "train", "loss": 2.5, "lr": 1e-3},
        {"step": 2, "kind": "eval", "eval_set": "fin", "eval_loss": 2.7},
        {"step": 2, "kind": "eval", "eval_set": "news", "eval_loss": 2.9},
        {"step": 2, "kind": "resume", "resumed_from": "step-00000002", "changed": {}},
    ]
    assert loss_curves(records) == {
        "train": [(1, 3.0), (2, 2.5)],
        "eval": [(1, 3.5)],
        "eval fin": [(2, 2.7)],
        "eval news": [(2, 2.9)],
    }


def test_tensorboard_event_files_hold_the_logged_scalars(watched_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(watched_run.out / "tensorboard"))
    events.Reload()
    records = read_metrics(watched_run.out / "metrics.jsonl")
    for kind, field, tag in (
        ("train", "loss", "train/loss"),
        ("train", "lr", "train/lr"),
        ("eval", "eval_loss", "eval/val/loss"),
    ):
        expected = [(r["step"], r[field]) for r in records if r["kind"] == kind]
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        for (_, got), (_, want) in zip(logged, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-6)  # stored as float32
    assert {"train/tok_per_s", "train/grad_norm", "train/eta_s"} <= set(events.Tags()["scalars"])
    assert "run" in " ".join(events.Tags()["tensors"])  # the header, as text


def test_wandb_gets_the_same_scalars_and_the_run_facts(watched_run):
    (run,) = watched_run.wandb
    records = read_metrics(watched_run.out / "metrics.jsonl")
    expected = [(r["step"], scalars_of(r)) for r in records if r["kind"] in ("train", "eval")]
    assert run.logged == expected
    step, scalars = run.logged[3]  # step 0's eval, two steps, then step 2's eval
    assert step == 2 and scalars["eval/val/loss"] == records[3]["eval_loss"]
    assert scalars["eval/val/ppl"] == records[3]["eval_ppl"]
    assert run.finished
    config = run.init_kwargs["config"]
    assert config["lora_r"] == 8 and config["run"]["attn"]["backend"] == "sdpa"
    assert run.init_kwargs["name"] == "run" and run.init_kwargs["resume"] == "allow"


@pytest.mark.slow
def test_a_resumed_run_continues_its_sinks_without_duplicate_steps(watched_run, packed_sample, tmp_path):
    """Killed after its step-2 checkpoint (steps 3-4 logged), then resumed: TensorBoard keeps one value
    per step, the resumed values; W&B continues the same run; run.json gains a second start."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    shutil.copytree(watched_run.out, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "adapter")
    runs: list[FakeWandbRun] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake_wandb_module(runs))
        train(config(packed_sample, out, tensorboard=True, wandb=True, resume=True), log=lambda _: None)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = read_metrics(out / "metrics.jsonl")
    expected = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    (resumed,) = runs
    assert resumed.init_kwargs["id"] == watched_run.wandb[0].init_kwargs["id"]
    assert [step for step, _ in resumed.logged] == [3, 4, 4]
    assert [start["start_step"] for start in read_run_json(out)] == [0, 2]


def test_a_sink_asked_for_but_not_installed_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
    with pytest.raises(UserError, match=r"--wandb needs the `wandb` package.*pip install wandb"):
        open_sinks(tmp_path, tensorboard=False, wandb=True, start_step=0, resumed=False, header=[], config={})
    monkeypatch.setattr("train.sinks.tensorboard_installed", lambda: False)
    with pytest.raises(UserError, match=r"--tensorboard needs the `tensorboard` package"):
        open_sinks(tmp_path, tensorboard=True, wandb=False, start_step=0, resumed=False, header=[], config={})
    # installed but broken: refused when asked for by name, reported and skipped by default
    monkeypatch.setattr("train.sinks.tensorboard_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"--tensorboard: torch.utils.tensorboard does not import"):
        open_sinks(tmp_path, tensorboard=True, wandb=False, start_step=0, resumed=False, header=[], config={})
    sinks = open_sinks(
        tmp_path, tensorboard=None, wandb=False, start_step=0, resumed=False, header=[], config={}
    )
    assert sinks.names == [] and sinks.not_opened[0].startswith("tensorboard: installed but does not import")
    monkeypatch.setattr("train.sinks.tensorboard_installed", lambda: False)
    # by default TensorBoard is on only when installed: here it is not, and nothing is opened
    sinks = open_sinks(
        tmp_path, tensorboard=None, wandb=False, start_step=0, resumed=False, header=[], config={}
    )
    assert sinks.names == [] and not (tmp_path / "tensorboard").exists()


def test_run_with_wandb_but_no_wandb_fails_with_the_install_line(packed_sample, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from train.cli import app

    monkeypatch.setitem(sys.modules, "wandb", None)
    args = ["run", "--data", str(packed_sample), "--model", "tiny-qwen2", "--out", str(tmp_path / "run")]
    args += ["--max-steps", "2", "--device", "cpu", "--attn", "sdpa", "--wandb", "--no-tensorboard"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "--wandb needs the `wandb` package" in " ".join(result.output.split())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the model loads


def _mock_gpu(monkeypatch, name: str, *, flash: bool, varlen: bool) -> None:
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: varlen)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(runinfo, "device_label", lambda device: f"cuda:0 ({name}, 80.0 GiB)")


def _gpu_info(requested: str, packed_sample: Path):
    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    model = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa", lora=LoraSettings(r=8, alpha=16))
    causal_lm(
        model
    ).packed_compute_dtype = torch.bfloat16  # --dtype auto on a bf16 GPU, as load_model sets it
    plan = make_plan(batch_size=8, seq_len=1024, max_steps=100, warmup_ratio=0.1)
    with warnings.catch_warnings():  # autocast("cuda") warns that CUDA is not available: it is mocked
        warnings.simplefilter("ignore")
        info = describe_run(
            cfg_model="tiny-qwen2",
            model=model,
            attn=attention.choose_attn(requested, "cuda"),
            plan=plan,
            device=torch.device("cuda", 0),
            requested_device="auto",
            world_size=1,
            start_step=0,
            flops_per_token=1e9,
            device_reason="auto: CUDA 12.8, 1 GPU(s)",
        )
    return info, plan


def test_a_gpu_run_falling_back_to_the_reference_is_warned_about(monkeypatch, packed_sample):
    _mock_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", flash=False, varlen=False)
    info, plan = _gpu_info("auto", packed_sample)
    assert (info.attn.backend, info.attn.is_gpu_reference) == ("sdpa", True)
    assert (
        "flash-attn does not import" in info.attn.reason
        and "no torch.nn.attention.varlen" in info.attn.reason
    )
    (warning,) = warning_lines(info)
    assert warning.startswith("warning: this GPU run uses the per-segment SDPA reference")
    assert "install flash-attn" in warning
    header = header_lines(info, plan)
    assert f"attention        sdpa ({info.attn.reason})" in header
    assert "compute bfloat16" in header[1]
    assert "peak 989 TFLOP/s dense bf16" in " ".join(header)
    # asked for by name on a GPU: still warned, with the other fix
    (warning,) = warning_lines(dataclasses.replace(info, attn=attention.choose_attn("sdpa", "cuda")))
    assert "pass --attn auto" in warning


def test_no_warning_when_a_gpu_run_has_a_varlen_kernel(monkeypatch, packed_sample):
    """Negative control: the same mocked GPU with torch's varlen kernel."""
    _mock_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", flash=False, varlen=True)
    info, _ = _gpu_info("auto", packed_sample)
    assert info.attn.backend == "torch_varlen" and "has torch.nn.attention.varlen" in info.attn.reason
    assert warning_lines(info) == []


def test_an_unknown_gpu_gets_no_mfu(monkeypatch, packed_sample):
    _mock_gpu(monkeypatch, "NVIDIA Future 9000", flash=False, varlen=True)
    info, plan = _gpu_info("auto", packed_sample)
    assert info.peak_flops is None
    assert "peak unknown GPU" in " ".join(header_lines(info, plan))


def test_step_line_shows_mfu_only_when_known():
    common = {"step": 7, "num_steps": 100, "loss": 2.5, "lr": 1e-4, "num_targets": 8190, "tok_per_s": 51234.0}
    common["mem_bytes"] = 2**31
    line = step_line(**common, mfu=0.3125, eta_s=125.0)
    assert line == (
        "step      7/100 | loss 2.5000 | lr 1.00e-04 | targets 8,190 | tok/s    51,234 | mfu 31.2%"
        " | mem 2.00 GiB | eta 2m05s"
    )
    assert "mfu" not in step_line(**common, mfu=None, eta_s=125.0)


def test_peak_table_matches_device_names():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == pytest.approx(165.2e12)
    assert peak_flops("NVIDIA GeForce GTX 1080") is None


def _hand_count(config, lora_r: int | None) -> tuple[float, float]:
    """(frozen, trainable) matmul weights of a Qwen2 config, from its shape."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    base = layers * sum(i * o for i, o in shapes) + d * config.vocab_size  # + the (tied) output head
    adapters = 0 if lora_r is None else layers * sum(lora_r * (i + o) for i, o in shapes)
    return base, adapters


@pytest.mark.parametrize("lora_r", [8, None])
def test_flops_per_token_count_frozen_weights_4x_trainable_6x_and_attention(packed_sample, lora_r):
    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    lora = LoraSettings(r=lora_r, alpha=16) if lora_r else None
    model = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa", lora=lora)
    config = model.config
    base, adapters = _hand_count(config, lora_r)
    matmuls = (4 * base + 6 * adapters) if lora_r else 6 * base
    attention_flops = 3 * config.num_hidden_layers * 4 * config.hidden_size * 100.0
    assert train_flops_per_token(model, mean_context=100.0) == pytest.approx(
        matmuls + attention_flops, rel=1e-12
    )


def test_mean_causal_context_over_every_row(packed_sample):
    split = PackedDataset(packed_sample).split("val")
    pairs = tokens = 0
    for i in range(split.num_rows):
        cu = split.row(i).cu_seqlens.tolist()
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            pairs += (b - a) * (b - a + 1) // 2
            tokens += b - a
    assert mean_causal_context(split, max_rows=split.num_rows) == pytest.approx(pairs / tokens, rel=1e-12)
    assert 1 < pairs / tokens < 128


def test_eta_and_durations():
    pace = Pace(first_step=10, num_steps=30, train_s=1000.0)
    assert pace.eta_s(20) == pytest.approx(1000.0)  # 10 steps took 1000 s, 10 are left
    assert pace.eta_s(30) == 0.0
    # evaluations are priced apart: the step-0 eval (100 s) is not the time of step 1
    pace = Pace(first_step=0, num_steps=10, eval_every=5, train_s=1.0, eval_s=100.0, num_evals=1)
    assert pace.eta_s(1) == pytest.approx(9 * 1.0 + 2 * 100.0)  # steps 2-10, evals after 5 and 10
    assert [pace.evals_left(step) for step in (1, 5, 6, 10)] == [2, 2, 1, 1]
    pace = Pace(first_step=0, num_steps=12, eval_every=5)
    assert [pace.evals_left(step) for step in (1, 10, 11, 12)] == [3, 2, 1, 1]  # and after the last
    assert Pace(first_step=0, num_steps=12).evals_left(1) == 0
    assert [format_duration(s) for s in (0, 42.4, 185, 7620, 273600)] == [
        "0s",
        "42s",
        "3m05s",
        "2h07m",
        "3d04h",
    ]


def test_the_eta_counts_training_steps_and_prices_evaluations_apart(packed_sample, tmp_path, monkeypatch):
    """An evaluation that takes 1000 s (a clock moved on while it runs) is not the time of step 1: the
    step lines' eta is the steps' time per step times the steps left, plus 1000 s per evaluation left."""
    offset = [0.0]
    real = time.perf_counter

    def evaluate_slowly(run, step, evaluate=loop.evaluate_run):
        offset[0] += 1000.0
        return evaluate(run, step)

    clock = types.SimpleNamespace(perf_counter=lambda: real() + offset[0])
    monkeypatch.setattr(throughput, "time", clock)
    monkeypatch.setattr(loop, "evaluate_run", evaluate_slowly)
    out = tmp_path / "run"
    train(config(packed_sample, out, eval_every=100, save_every=0, tensorboard=False), log=lambda _: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eta = {r["step"]: r["eta_s"] for r in records if r["kind"] == "train"}
    tok_per_s = [r["tok_per_s"] for r in records if r["kind"] == "train"]
    # evals at step 0 and after step 4: at step 1, 3 steps and one 1000 s eval are left
    assert 1000.0 < eta[1] < 1000.0 + 3 * 60.0, eta  # the step-0 eval counted as a step: over 3000 s
    assert 1000.0 < eta[3] < 1000.0 + 60.0 and eta[4] > 1000.0  # step 4's eval is still to come
    assert min(tok_per_s) > 1.0  # a step's tok/s is its own time (1000 s per step would be < 1)


def _train_quietly(cfg: RunConfig) -> None:
    torch.set_num_threads(1)
    train(cfg, log=lambda _: None)


def test_a_run_killed_after_its_first_checkpoint_has_a_loss_plot(packed_sample, tmp_path):
    """loss.png is redrawn at every checkpoint and eval, not only when the run ends."""
    out = tmp_path / "run"
    cfg = config(packed_sample, out, max_steps=400, save_every=2, eval_every=0, tensorboard=False)
    child = multiprocessing.get_context("fork").Process(target=_train_quietly, args=(cfg,))
    child.start()
    deadline = time.monotonic() + 120
    try:
        while not (out / "loss.png").exists():
            assert child.is_alive(), "the run ended before it drew loss.png"
            assert time.monotonic() < deadline, "no loss.png after 120 s"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    assert (out / "checkpoints" / "step-00000002").is_dir()
    assert not (out / "adapter").exists()  # the run did not reach its end
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "tensorboard").exists()  # tensorboard=False (--no-tensorboard)
