"""`train run` on several ranks (gloo on CPU, forked processes): resume on another number of ranks,
FSDP2 full fine-tuning against one process, and the bucketed gradient all-reduce."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from shared.errors import UserError
from shared.reader import PackedDataset
from tests.train.test_run import _rank_main, quiet, tiny
from train.config import ConfigError
from train.loop import train
from train.model import load_model
from train.outputs import read_metrics
from train.parallel import all_reduce_grads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cfg, world_size: int, tmp_path: Path) -> dict:
    """``train(cfg)`` on ``world_size`` forked gloo ranks; rank 0's losses (keys are step strings)."""
    result_file = tmp_path / f"{cfg.out.name}.json"
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers)
    mp.start_processes(
        _rank_main, args=(world_size, free_port(), cfg, result_file), nprocs=world_size, start_method="fork"
    )
    return json.loads(result_file.read_text())


def grad_norms(out: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(out / "metrics.jsonl") if "grad_norm" in r]


def keep_through(out: Path, step: int) -> None:
    """Make ``out`` look like the run was killed right after its step-``step`` checkpoint."""
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    for export in ("adapter", "model"):
        shutil.rmtree(out / export, ignore_errors=True)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_losses(packed_sample, tmp_path):
    """A 2-rank x grad_accum 1 run, resumed on 1 rank x grad_accum 2 from its step-2 checkpoint, goes
    on with the uninterrupted 2-rank losses: the loader position is global rows, not per-rank batches."""
    options = {"max_steps": 4, "save_every": 2, "batch_size": 2}
    two = run_ranks(tiny(packed_sample, tmp_path / "two", **options), 2, tmp_path)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "two", killed)
    keep_through(killed, 2)
    state = json.loads((killed / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["loader"]["rows_in_epoch"] == 2 * 4 and state["world_size"] == 2

    # negative control: another number of rows per step is refused, naming the flags to change
    with pytest.raises(UserError, match="--grad-accum") as refused:
        train(tiny(packed_sample, killed, resume=True, **options), log=quiet)
    assert "4 rows per step" in str(refused.value) and "= 2" in str(refused.value)

    resumed = train(tiny(packed_sample, killed, resume=True, grad_accum=2, **options), log=quiet)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(two["losses"][str(step)], rel=1e-5, abs=1e-6)
    assert grad_norms(killed) == pytest.approx(grad_norms(tmp_path / "two"), rel=1e-5)
    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_rank_full_finetune_and_resume_without_fsdp(packed_sample, tmp_path):
    """FSDP2 (gloo, CPU) on 2 ranks == one process with twice the micro-batches, every weight trained;
    its gathered checkpoint resumes on one process without FSDP."""
    options = {"max_steps": 3, "save_every": 2, "batch_size": 1, "lora": False, "lr": 1e-3}
    # grad_accum 2 on each rank: gradients are reduce-scattered after the second micro-batch only
    sharded = run_ranks(
        tiny(packed_sample, tmp_path / "fsdp", fsdp=True, grad_accum=2, **options), 2, tmp_path
    )
    single = train(tiny(packed_sample, tmp_path / "one", grad_accum=4, **options), log=quiet)
    for step in (1, 2, 3):
        assert sharded["losses"][str(step)] == pytest.approx(single.losses[step], rel=1e-5, abs=1e-6)
    # AdamW hides a constant gradient factor from the losses; the logged gradient norm does not
    norms = [grad_norms(tmp_path / name) for name in ("fsdp", "one")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    a = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # negative control: the exported weights are the trained ones, not the initial ones
    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    initial = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa", seed=0).state_dict()
    assert not torch.allclose(
        a["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"]
    )

    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "fsdp", killed)
    keep_through(killed, 2)
    resumed = train(tiny(packed_sample, killed, resume=True, grad_accum=4, **options), log=quiet)
    assert resumed.losses[3] == pytest.approx(sharded["losses"]["3"], rel=1e-5, abs=1e-6)
    # and on 2 ranks with FSDP again: the gathered state is set back into the shards
    keep_through(killed, 2)
    again = run_ranks(
        tiny(packed_sample, killed, resume=True, fsdp=True, grad_accum=2, **options), 2, tmp_path
    )
    assert list(again["losses"]) == ["3"]
    assert again["losses"]["3"] == pytest.approx(sharded["losses"]["3"], rel=1e-6, abs=1e-6)


def _grad_rank(rank: int, world_size: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        params = [
            torch.nn.Parameter(torch.zeros(n, dtype=d))
            for n, d in ((3, torch.float32), (4, torch.float32), (2, torch.float64), (5, torch.float32))
        ]
        for i, p in enumerate(params[:3]):  # the last one has no gradient on either rank
            p.grad = torch.full_like(p, float(10 * rank + i + 1))
        all_reduce_grads(params, bucket_elements=5)  # several buckets, split by size and by dtype
        if rank == 0:
            torch.save([p.grad for p in params], out)
    finally:
        dist.destroy_process_group()


def test_all_reduce_grads_sums_every_bucket(tmp_path):
    out = tmp_path / "grads.pt"
    mp.start_processes(_grad_rank, args=(2, free_port(), out), nprocs=2, start_method="fork")
    grads = torch.load(out)
    # rank 0 holds i + 1, rank 1 holds 10 + i + 1: the sum is 2i + 12
    for i, g in enumerate(grads[:3]):
        assert torch.equal(g, torch.full_like(g, float(2 * i + 12))), (i, g)
    assert torch.equal(grads[3], torch.zeros(5)) and grads[2].dtype == torch.float64


def test_fsdp_needs_full_finetuning_and_several_ranks(packed_sample, tmp_path):
    with pytest.raises(ConfigError, match="--fsdp shards full fine-tuning; add --no-lora"):
        tiny(packed_sample, tmp_path, max_steps=1, fsdp=True)
    with pytest.raises(UserError, match="torchrun --nproc-per-node"):
        train(tiny(packed_sample, tmp_path, max_steps=1, fsdp=True, lora=False), log=quiet)


class FirstRows:
    """The first ``num_rows`` rows of a split: an odd count, so that 2 ranks get unequal shares."""

    def __init__(self, split, num_rows: int) -> None:
        self.split, self.num_rows, self.name = split, num_rows, split.name

    def row(self, index: int):
        assert index < self.num_rows
        return self.split.row(index)


def _eval_rank(rank: int, world_size: int, port: int, data: Path, lockstep: bool, out: Path) -> None:
    from datetime import timedelta

    from train.eval import evaluate
    from train.parallel import shard_fsdp

    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=10),
    )
    try:
        dataset = PackedDataset(data)
        model = load_model("tiny-qwen2", vocab_size=dataset.manifest.tokenizer.vocab_size, attn="sdpa")
        root = shard_fsdp(model, torch.device("cpu"))
        split = FirstRows(dataset.split("val"), 5)
        loss = evaluate(
            model, split, batch_size=1, device=torch.device("cpu"), loss_fn=root, lockstep=lockstep
        )
        if rank == 0:
            out.write_text(json.dumps(loss))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_eval_keeps_ranks_in_lockstep_over_unequal_shares(packed_sample, tmp_path):
    """5 rows on 2 ranks: rank 0 evaluates 3, rank 1 only 2; rank 1 must still join the third gather."""
    from train.eval import evaluate

    out = tmp_path / "eval.json"
    mp.start_processes(
        _eval_rank, args=(2, free_port(), packed_sample, True, out), nprocs=2, start_method="fork"
    )
    dataset = PackedDataset(packed_sample)
    model = load_model("tiny-qwen2", vocab_size=dataset.manifest.tokenizer.vocab_size, attn="sdpa")
    reference = evaluate(model, FirstRows(dataset.split("val"), 5), batch_size=1, device=torch.device("cpu"))
    assert json.loads(out.read_text()) == pytest.approx(reference, rel=1e-6)
    # negative control: without lockstep the ranks fall out of step and a rank fails (a gloo timeout,
    # or its peer's closed connection, whichever process reports first)
    out.unlink()
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        mp.start_processes(
            _eval_rank, args=(2, free_port(), packed_sample, False, out), nprocs=2, start_method="fork"
        )


def _load_old_format_rank(rank: int, world_size: int, port: int, data: Path, ckpt: Path, out: Path) -> None:
    from train.checkpoint import CheckpointError, load_checkpoint
    from train.parallel import shard_fsdp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        vocab_size = PackedDataset(data).manifest.tokenizer.vocab_size
        model = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa")
        shard_fsdp(model, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        try:
            load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
            out.write_text("loaded")
        except CheckpointError as e:
            out.write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_fsdp_refuses_a_checkpoint_with_positional_optimizer_state(packed_sample, tmp_path):
    """Full fine-tuning checkpoints written before they were keyed by parameter name cannot be set
    into shards; the message says to resume without --fsdp."""
    from train.checkpoint import save_checkpoint

    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    model = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa")
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ckpt = save_checkpoint(
        tmp_path / "old", step=1, model=model, optimizer=optimizer, scheduler=scheduler, loader_state={}
    )
    out = tmp_path / "result.txt"
    args = (1, free_port(), packed_sample, ckpt, out)
    mp.start_processes(_load_old_format_rank, args=args, nprocs=1, start_method="fork")
    assert "by position (an older format); resume it without --fsdp" in out.read_text()
    # the same checkpoint still resumes a plain (unsharded) model
    from train.checkpoint import load_checkpoint

    load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)


def test_explicit_cuda_index_under_torchrun_is_refused(monkeypatch):
    from shared.errors import UserError
    from train.parallel import init_distributed_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="every rank on one GPU"):
        init_distributed_from_env("cuda:1")
