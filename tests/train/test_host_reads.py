"""A training step reads nothing back to the host between log points (train/loop.py, "No host
synchronisation in a step"), and deferring the reads changes no record of metrics.jsonl.

On a GPU every read of a device tensor makes the CPU wait for the GPU. On the CPU a read costs
nothing, so here reads are counted: the tensor methods that read values are wrapped for the duration
of a run, and every call made from a step (from the start of `train_step` to the end of its
`log_step`) is counted, except the few below that read host tensors by design. The GPU itself is
checked by benchmarks/gpu_check.py (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import train.loop as loop
from train.config import RunConfig
from train.loop import train

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
"""The tensor methods that bring values to the host (and `torch.equal`, wrapped too)."""

HOST_BY_DESIGN = {
    ("torch/optim/optimizer.py", "_get_value"): "AdamW's step counters are CPU tensors on a GPU run too",
    ("train/attention.py", "reference_varlen"): "the sdpa reference loops over segments on the host;"
    " a GPU run uses the varlen kernels",
    ("train/model.py", "_check_batch"): "reads cu_seqlens only when the batch is on the CPU",
}
"""Callers whose reads would not wait for a GPU, each with the reason."""

TIMING = ("tok_per_s", "eta_s", "mem_bytes", "mfu")
"""Record fields measured from the clock or the process: the only ones two runs may differ in."""


def config(data: Path, out: Path, **options) -> RunConfig:
    base = {"model": "tiny-qwen2", "batch_size": 2, "lora_r": 8, "lora_alpha": 16, "lr": 3e-3}
    base |= {"device": "cpu", "attn": "sdpa", "eval_every": 0, "save_every": 0, "tensorboard": False}
    return RunConfig(data=data, out=out, **{**base, **options})


def quiet(_: str) -> None:
    pass


def count_step_reads(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[str]]:
    """Wrap the reading methods and the loop's step functions; the answer fills in as steps run:
    step -> its reads (``"tolist in train/loop.py:read_steps"``)."""
    reads: dict[int, list[str]] = {}
    current: list[int | None] = [None]

    def counted(name: str, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code
            path = caller.co_filename.replace(os.sep, "/")
            by_design = any(path.endswith(f) and caller.co_name == fn for f, fn in HOST_BY_DESIGN)
            if current[0] is not None and not by_design:
                reads[current[0]].append(f"{name} in {path.split('/site-packages/')[-1]}:{caller.co_name}")
            return original(*args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "equal", counted("equal", torch.equal))
    train_step, log_step = loop.train_step, loop.log_step

    def counting_train_step(run):
        current[0] = step = run.start_step + len(reads) + 1
        reads[step] = []
        return train_step(run)

    def counting_log_step(run, step, stats):
        log_step(run, step, stats)
        current[0] = None

    monkeypatch.setattr(loop, "train_step", counting_train_step)
    monkeypatch.setattr(loop, "log_step", counting_log_step)
    return reads


@pytest.mark.parametrize("log_every", [4, 1])
def test_a_step_reads_nothing_from_the_device_between_log_points(
    packed_sample, tmp_path, monkeypatch, log_every
):
    """log_every 4: steps 1-3 and 5-7 read nothing, steps 4 and 8 read their window. log_every 1 is
    the negative control: every step reads, so the counter sees reads where there are some."""
    reads = count_step_reads(monkeypatch)
    train(config(packed_sample, tmp_path / "run", max_steps=8, log_every=log_every), log=quiet)
    assert sorted(reads) == list(range(1, 9))
    for step, found in reads.items():
        if step % log_every == 0:
            assert found, f"step {step} logs but read nothing: the counter is broken"
            assert any("read_steps" in r for r in found), found
        else:
            assert found == [], f"step {step} read from the device between log points: {found}"


def without_timing(path: Path) -> list[str]:
    """metrics.jsonl's lines, each record re-serialised without its timing fields (order kept)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}) for r in records]


def test_metrics_are_the_same_whether_read_every_step_or_every_third(packed_sample, tmp_path):
    """Checkpoints (every 2) and evals (every 5) fall between log points: their records still come
    after those of every step before them, and every value is the same as when each step is read."""
    options = {"max_steps": 7, "save_every": 2, "eval_every": 5, "eval_max_tokens": 256}
    train(config(packed_sample, tmp_path / "every", log_every=1, **options), log=quiet)
    lines: list[str] = []
    train(config(packed_sample, tmp_path / "third", log_every=3, **options), log=lines.append)
    every, third = (
        without_timing(tmp_path / "every" / "metrics.jsonl"),
        without_timing(tmp_path / "third" / "metrics.jsonl"),
    )
    kinds = [(json.loads(r)["step"], json.loads(r)["kind"]) for r in third]
    assert kinds == [
        (0, "eval"),
        *[(s, "train") for s in range(1, 6)],
        (5, "eval"),
        (6, "train"),
        (7, "train"),
        (7, "eval"),
    ]
    assert third == every
    assert [line.split(" | ")[0].split()[1] for line in lines if line.startswith("step ")] == [
        "3/7",
        "6/7",
        "7/7",
    ]


def _killed_at(cfg: RunConfig, step: int) -> None:
    """Run ``cfg`` and die (no cleanup, as under SIGKILL) when step ``step`` is about to start."""
    torch.set_num_threads(1)
    taken = []
    train_step = loop.train_step

    def dying_train_step(run):
        taken.append(1)
        if run.start_step + len(taken) == step:
            os._exit(17)
        return train_step(run)

    loop.train_step = dying_train_step
    train(cfg, log=quiet)


def test_a_run_killed_between_log_points_resumes_to_the_same_metrics(packed_sample, tmp_path):
    """log_every 3, a checkpoint at step 4: killed as step 6 starts, step 4 was read for its
    checkpoint and step 5 was taken but never read; the resumed run's metrics.jsonl equals the
    uninterrupted one's, plus its resume record."""
    options = {"max_steps": 9, "save_every": 4, "log_every": 3}
    train(config(packed_sample, tmp_path / "full", **options), log=quiet)
    out = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(
        target=_killed_at, args=(config(packed_sample, out, **options), 6)
    )
    child.start()
    child.join()
    assert child.exitcode == 17
    # steps 1-3 read at the log point, 4 before its checkpoint; 5 lost with the process
    assert [json.loads(r)["step"] for r in without_timing(out / "metrics.jsonl")] == [1, 2, 3, 4]
    train(config(packed_sample, out, resume=True, **options), log=quiet)
    resumed = without_timing(out / "metrics.jsonl")
    assert [r for r in resumed if '"resume"' in r] == [
        json.dumps({"step": 4, "kind": "resume", "resumed_from": "step-00000004", "changed": {}})
    ]
    assert [r for r in resumed if '"resume"' not in r] == without_timing(tmp_path / "full" / "metrics.jsonl")
    shutil.rmtree(out)
