"""The GPU comparison runs only when a device is lent, so every contender's harness is run here on the CPU.

``gpu_bench.py --cpu-smoke`` trains a tiny Qwen2 for two steps on the bundled sample with each contender
(ours, ours with the checkpointed loss, the Hugging Face model with DataCollatorWithFlattening, transformers.Trainer, TRL's SFTTrainer,
ours compiled), in fp32, and compares their losses with ours at a tight tolerance. The negative control
(labels off by one) must be reported as disagreeing, or agreement would prove nothing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_ONLY = {"ours_flash_attn", "hf_flatten_fa2", "ours_liger"}
"""Contenders that need CUDA or a package the CPU suite does not install: skipped with a reason."""


@pytest.mark.slow
def test_cpu_smoke_runs_every_contender_and_they_agree(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_bench.json").read_text())
    runs = report["runs"]["tiny"]
    assert report["all_agree"] is True
    assert report["settings"]["dtype"] == "float32"
    expected = {
        "ours",
        "ours_grad_ckpt",
        "ours_unfused",
        "hf_flatten_sdpa",
        "hf_flatten_varlen",
        "ours_compile",
    }
    # Trainer needs accelerate and SFTTrainer trl, which the bench extra installs and CI need not.
    if importlib.util.find_spec("accelerate") is not None:
        expected.add("hf_trainer")
        if importlib.util.find_spec("trl") is not None:
            expected.add("trl_sft")
    for name in expected:
        r = runs[name]
        assert r["status"] == "ok", (name, r)
        assert r["agrees"] is True and r["compared_steps"] == 2, (name, r)
        assert r["tokens_per_s"] > 0
    for name in GPU_ONLY:
        assert runs[name]["status"] == "not_available" and runs[name]["why"], runs[name]
        assert f"{name}: not available: " in done.stdout
    # the memory estimate of `train plan --model` rides along, to be checked against a GPU's measured peak
    assert 0 < runs["ours_grad_ckpt"]["estimate_gib"] < runs["ours"]["estimate_gib"]
    control = runs["control_wrong_labels"]
    assert control["status"] == "ok" and control["agrees"] is False
    # Caught by a wide margin, not by round-off: the check tells a wrong step from a right one.
    assert control["loss_max_rel_diff"] > 100 * report["settings"]["tolerance"]
    sys.path.insert(0, str(REPO / "benchmarks"))
    import report_gpu

    table = "\n".join(report_gpu.render_bench(out / "gpu_bench.json"))
    assert "| ours_liger | " in table and "not available (liger-kernel is not installed)" in table
    assert "negative control: disagrees, as it must" in table
    assert "**disagrees, not ranked**" not in table
    scaling = report["prep_scaling"]["runs"]
    assert [r["workers"] for r in scaling] == [1, 2]
    assert scaling[0]["num_tokens"] == scaling[1]["num_tokens"] > 0
