"""Render the GPU check's figures (benchmarks/gpu/*.json, written by gpu_check.py on a lent GPU) for BENCHMARKS.md.

The CPU benchmarks run on this machine; the GPU figures come from separate runs of
``benchmarks/gpu_check.sh`` on a GPU machine, kept as JSON beside their logs. Each table states which run.
"""

from __future__ import annotations

import json
from pathlib import Path

GPU_DIR = Path(__file__).with_name("gpu")
LATEST = GPU_DIR / "gpu_check.json"
EARLIER = GPU_DIR / "gpu_check_run1.json"
"""The first run, before adapter inputs stopped being cast to fp32 (train/model.py)."""


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _verdict(entry: dict, key: str = "passed") -> str:
    return {True: "ok", False: "**FAIL**"}.get(entry.get(key), "not recorded")


def _checks(g: dict) -> list[str]:
    lines = ["| check | backend | figure | result |", "| --- | --- | --- | :---: |"]
    for backend, a in g.get("agreement", {}).items():
        lines.append(
            f"| logits vs the sdpa reference, same weights, bf16 | {backend} | max abs diff"
            f" {a['logit_max_abs_diff']:.3g} (logits up to {a['logit_scale']:.3g}; tolerance"
            f" {a['relative_tolerance']} x that) | {_verdict(a)} |"
        )
    for backend, a in g.get("gradients", {}).items():
        lines.append(
            f"| LoRA gradients vs the sdpa reference | {backend} | relative L2 diff"
            f" {a['lora_grad_relative_diff']:.3g} (tolerance {a['tolerance']}) | {_verdict(a)} |"
        )
    for backend, a in g.get("isolation", {}).items():
        caught = {True: "rejected", False: "**NOT rejected**"}.get(a.get("naive_rejected"), "not recorded")
        lines.append(
            f"| packed row vs each document alone | {backend} | max abs logit diff"
            f" {a['packed_vs_alone']:.3g}; naive causal mask: {a['naive_control']:.3g} ({caught}) |"
            f" {_verdict(a)} |"
        )
    return lines


def _throughput(g: dict, earlier: dict | None) -> list[str]:
    lines = [
        "| model, tokens per micro-batch | mode | real tokens/s | vs padded | step | TFLOP/s | MFU | peak GiB"
        + (" | tokens/s, first run |" if earlier else " |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if earlier else ""),
    ]
    before = (earlier or {}).get("gpu", {}).get("throughput", {})
    for key, modes in g.get("throughput", {}).items():
        padded = modes.get("padded", {}).get("tokens_per_s")
        for mode, m in modes.items():
            then = before.get(key, {}).get(mode, {}).get("tokens_per_s")
            tail = (f" {then:,.0f} |" if then else " - |") if earlier else ""
            if "tokens_per_s" not in m:
                lines.append(f"| {key} | {mode} | out of memory | | | | | |" + (" |" if earlier else ""))
                continue
            ratio = f"{m['tokens_per_s'] / padded:.2f}x" if padded else "(padded OOM)"
            mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "-"
            lines.append(
                f"| {key} | {mode} | {m['tokens_per_s']:,.0f} | {ratio} | {m['step_ms']:.0f} ms"
                f" | {m['tflops']:.0f} | {mfu} | {m['peak_gib']:.1f} |" + tail
            )
    return lines


def render_gpu() -> list[str]:
    """The ``## GPU`` section: checks and throughput of the latest run, or a line saying none ran."""
    latest = _load(LATEST)
    if latest is None or "gpu" not in latest:
        return [
            "## GPU",
            "",
            "Not measured: no GPU run is recorded. Run `benchmarks/gpu_check.sh` on a CUDA machine.",
            "",
        ]
    g, v = latest["gpu"], latest["versions"]
    peak = g["peak_tflops"]
    lines = [
        "## GPU",
        "",
        f"From `python benchmarks/gpu_check.py --steps 10 --tokens-per-batch 8192,16384` on a lent {g['device']}"
        f" (log: `benchmarks/gpu/gpu_check.log`), not from the CPU run above. Its image: torch {v['torch']},"
        f" transformers {v['transformers']}, peft {v['peft']}; flash-attn is not installed there, so"
        " `flash_attn` did not run and `torch_varlen` (PyTorch's varlen kernel) is the fast backend measured.",
        "",
        f"bf16 matmul peak: {peak['datasheet_dense_bf16']} TFLOP/s by the datasheet,"
        f" {peak['measured_matmul_8192_bf16']:.0f} measured (8192^3). MFU below is against the datasheet and"
        " counts the useful FLOPs of real tokens for LoRA: the forward plus an input-gradient backward (2x"
        " the forward), attention by each document's causal context; padding earns nothing.",
        "",
        f"Correctness ({'all passed' if latest.get('all_checks_passed') else 'A CHECK FAILED'}):",
        "",
        *_checks(g),
        "",
        "Throughput: LoRA r=32 steps (AdamW) of randomly initialised Qwen2-shaped models on the same"
        " documents (4,000 log-normal lengths around 200 tokens, at most 1,024). `sdpa` is our per-document"
        " reference loop; `padded` is one document per row, right-padded, HF sdpa with a 2D mask.",
        "",
        *_throughput(g, _load(EARLIER)),
        "",
    ]
    return lines
