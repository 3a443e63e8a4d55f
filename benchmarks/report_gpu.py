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


BENCH = GPU_DIR / "gpu_bench.json"
"""Every contender on the same work (gpu_bench.py, run by gpu_all.sh on a lent GPU)."""


def _bench_cell(r: dict | None, control: bool = False) -> str:
    if r is None:
        return "not run"
    if r.get("status") == "not_available":
        return f"not available ({r['why']})"
    if r.get("status") != "ok":
        return r.get("status", "?").replace("_", " ")
    if "tokens_per_s" not in r:
        return "ran (not timed)"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    peak = f"{r['peak_gib']:.1f} GiB" if "peak_gib" in r else "-"
    if "estimate_gib" in r:
        peak += f" (estimate {r['estimate_gib']:.1f})"
    agree = "agrees" if r.get("agrees") else "**disagrees, not ranked**"
    if control:
        agree = "negative control: disagrees, as it must" if not r.get("agrees") else "**control NOT caught**"
    return (
        f"{r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, peak {peak}; loss diff"
        f" {r.get('loss_max_rel_diff', float('nan')):.1e} ({agree})"
    )


def render_bench(path: Path | None = None) -> list[str]:
    """The contenders x shapes table of the latest gpu_bench.py run, with its date, GPU and versions."""
    report = _load(path or BENCH)
    if report is None:
        return ["### Contenders", "", "Not measured: no `benchmarks/gpu/gpu_bench.json` is recorded.", ""]
    s, v = report["settings"], report["versions"]
    shapes = list(report["runs"])
    names = list(dict.fromkeys(n for runs in report["runs"].values() for n in runs))
    lines = [
        "### Contenders",
        "",
        f"{report['date']}, {report['device']}, from `bash benchmarks/gpu_all.sh` (gpu_bench.py). Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + f"; not installed: {', '.join(k for k, val in v.items() if not val) or 'none'}.",
        "",
        f"LoRA r={s['lora']['r']}/alpha={s['lora']['alpha']}, {s['dtype']}, AdamW lr {s['lr']}, one micro-batch"
        f" of {s['rows_per_batch']} packed rows ({s['seq_len']} tokens each at most) per step, {s['warmup']}"
        f" warm-up + {s['steps']} timed steps. Loss agreement: the first {s['compared_steps']} losses within"
        f" {s['tolerance']} x max(1, |ours|) of ours; `control_wrong_labels` (labels off by one) must disagree.",
        "",
        "| contender | attention | " + " | ".join(shapes) + " |",
        "| --- | --- | " + " | ".join("---" for _ in shapes) + " |",
    ]
    for name in names:
        attn = next((runs[name].get("attention", "") for runs in report["runs"].values() if name in runs), "")
        cells = [
            _bench_cell(report["runs"][shape].get(name), name == "control_wrong_labels") for shape in shapes
        ]
        lines.append(f"| {name} | {attn} | " + " | ".join(cells) + " |")
    scaling = report.get("prep_scaling")
    if scaling:
        lines += [
            "",
            f"`prep pack` on {scaling['corpus']} at seq_len {scaling['seq_len']}, {scaling['cpu_count']} cores:",
            "",
            "| workers | seconds | tokens/s | speedup vs 1 |",
            "| ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['workers']} | {r['seconds']:.2f} | {r['num_tokens'] / r['seconds']:,.0f} | {r['speedup_vs_first']:.2f}x |"
            for r in scaling["runs"]
        ]
    return [*lines, ""]
