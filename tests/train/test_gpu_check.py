"""The GPU check script runs only when a device is lent, so its code is exercised here on the CPU.

``--cpu-smoke`` runs every part with tiny shapes (sdpa standing in for the fast kernels): a script that
broke against a library update would otherwise be found only on a scarce GPU machine. The MFU
denominator is checked against the FLOPs of the model's own Linear layers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu_ok"] and report["all_checks_passed"]
    gpu = report["gpu"]
    for part in ("agreement", "gradients", "isolation"):
        assert "error" not in gpu[part], gpu[part]
        assert all(entry["passed"] is True for entry in gpu[part].values()), gpu[part]
    assert gpu["isolation"]["sdpa"]["naive_rejected"] is True
    # The naive forward must have been caught, or the isolation figures mean nothing.
    assert gpu["isolation"]["sdpa"]["naive_control"] > 1.0
    assert gpu["isolation"]["sdpa"]["packed_vs_alone"] == 0.0
    # `train run`'s steps ran under the sync watch's hooks; only CUDA can say whether they synced
    no_sync = gpu["no_sync"]
    assert no_sync["checked_steps"] == [4, 5, 7, 8] and "sync" not in no_sync
    assert no_sync["sync_debug_mode"] is False and no_sync["passed"] is None
    runs = gpu["throughput"]
    assert set(runs) == {f"{shape}@512" for shape in gpu_check.SHAPES}
    for modes in runs.values():
        assert set(modes) == {"sdpa", "padded"}
        assert all(m["tokens_per_s"] > 0 and m["tflops"] >= 0 for m in modes.values())


def test_flops_per_token_counts_the_models_own_linear_layers():
    config = gpu_check.qwen2_shape("qwen2-0.5b-shape")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    context = 100.0
    attention = 2 * 2 * config.hidden_size * context * config.num_hidden_layers
    # lm_head is tied to the embedding but still one matmul per token: it is among the Linear layers.
    assert gpu_check.forward_flops_per_token(config, context) == 2 * linear + attention
    assert gpu_check.lora_train_flops_per_token(config, context) == 2 * (2 * linear + attention)


def test_mean_causal_context():
    # A document of n tokens: query t attends to t + 1 keys, (n + 1) / 2 on average.
    assert gpu_check.mean_causal_context([1]) == 1.0
    assert gpu_check.mean_causal_context([3]) == 2.0
    assert gpu_check.mean_causal_context([3, 1]) == (1 + 2 + 3 + 1) / 4


def test_report_shows_each_recorded_verdict(tmp_path, monkeypatch):
    import report_gpu

    recorded = json.loads(report_gpu.LATEST.read_text())
    recorded["gpu"]["gradients"] = {
        "torch_varlen": {"lora_grad_relative_diff": 0.2, "tolerance": 0.05, "passed": False}
    }
    recorded["gpu"]["isolation"]["sdpa"]["naive_rejected"] = False
    latest = tmp_path / "gpu_check.json"
    latest.write_text(json.dumps(recorded))
    monkeypatch.setattr(report_gpu, "LATEST", latest)
    text = "\n".join(report_gpu.render_gpu())
    assert "relative L2 diff 0.2 (tolerance 0.05) | **FAIL** |" in text
    assert "(**NOT rejected**)" in text
