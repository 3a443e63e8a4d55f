"""`train plan` and the lr schedule: the run's arithmetic, shown before it runs."""

from __future__ import annotations

import math
import re

import pytest
from typer.testing import CliRunner

from train.cli import app
from train.plan import DataShape, PlanError, lr_factor, make_plan

runner = CliRunner()


def test_plan_cli_prints_the_budget_arithmetic():
    result = runner.invoke(
        app,
        [
            "plan",
            "--token-budget",
            "100000000",
            "--batch-size",
            "8",
            "--seq-len",
            "1024",
            "--warmup-ratio",
            "0.1",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"^tokens per step +8,192 ", out, re.M), out
    assert re.search(r"^steps +12,207$", out, re.M), out
    assert re.search(r"^warmup steps +1,220$", out, re.M), out
    assert re.search(r"^tokens used +99,999,744 +of budget 100,000,000$", out, re.M), out


def test_plan_budget_semantics():
    plan = make_plan(
        batch_size=4, seq_len=512, grad_accum=3, world_size=2, token_budget=1_000_000, warmup_ratio=0.25
    )
    assert plan.tokens_per_step == 4 * 512 * 3 * 2
    assert plan.num_steps == 1_000_000 // 12_288 == 81
    assert plan.num_warmup_steps == 20
    assert plan.tokens_used == 81 * 12_288 <= 1_000_000


def test_plan_with_data_counts_epochs(packed_sample):
    result = runner.invoke(
        app, ["plan", "--max-steps", "100", "--batch-size", "4", "--data", str(packed_sample)]
    )
    assert result.exit_code == 0, result.output
    assert "epochs" in result.output and "seq_len 128" in result.output
    plan = make_plan(
        batch_size=4,
        seq_len=128,
        max_steps=100,
        data=DataShape(num_rows=10, num_tokens=1000, num_target_tokens=900),
    )
    assert plan.epochs == pytest.approx(40.0)


def test_plan_refuses_a_budget_below_one_step():
    result = runner.invoke(app, ["plan", "--token-budget", "100", "--batch-size", "8", "--seq-len", "1024"])
    assert result.exit_code == 1
    assert "--token-budget 100 is less than one step of 8,192 tokens" in result.output
    with pytest.raises(PlanError, match="exactly one"):
        make_plan(batch_size=1, seq_len=8, token_budget=100, max_steps=3)


def test_plan_refuses_seq_len_zero_instead_of_replacing_it():
    result = runner.invoke(app, ["plan", "--max-steps", "3", "--seq-len", "0"])
    assert result.exit_code == 1
    assert "--seq-len 0 must be at least 1" in result.output
    # negative control: without --seq-len the default 1024 is used, and said
    default = runner.invoke(app, ["plan", "--max-steps", "3"])
    assert default.exit_code == 0 and "seq_len 1,024" in default.output


def test_plan_refuses_seq_len_that_contradicts_the_data(packed_sample):
    result = runner.invoke(
        app, ["plan", "--max-steps", "3", "--seq-len", "1024", "--data", str(packed_sample)]
    )
    assert result.exit_code == 1
    assert "packed at seq_len 128" in result.output


def test_lr_schedule_warms_up_then_decays_by_cosine():
    kw = {"num_steps": 100, "num_warmup_steps": 10, "min_lr_ratio": 0.1}
    factors = [lr_factor(s, **kw) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10], strict=False))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.1)
    mid = 10 + (100 - 10 - 1) / 2
    assert lr_factor(int(mid), **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 89))
    )
    assert lr_factor(0, num_steps=5, num_warmup_steps=0, min_lr_ratio=0.0) == 1.0


@pytest.mark.parametrize("command", ["plan", "run", "check"])
def test_every_command_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: train " + command in result.output
