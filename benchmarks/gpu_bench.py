"""Every contender's LoRA step on the same model, rows and GPU: tokens/s, MFU, peak memory, loss agreement.

The work (issue 18): Qwen2.5-0.5B- and 1.5B-shaped models (random weights, vocabulary 151,936; the shapes
of ``gpu_check.qwen2_shape``), LoRA r=32/alpha=64 on every linear layer of the blocks, bf16, AdamW, one
micro-batch of ``--tokens-per-batch`` tokens (whole packed rows of Reuters-21578, packed here with
``prep pack``, or the shards in ``--data``) per optimizer step. The contenders are in
``gpu_contenders.py``: ours (torch_varlen, flash_attn, torch.compile, Liger kernels, and with the
checkpointed loss instead of the fused one), the Hugging Face model driven with
``DataCollatorWithFlattening`` (sdpa, flash_attention_2, PyTorch's varlen flash kernel),
``transformers.Trainer`` and ``trl.SFTTrainer(padding_free=True)``, and a negative control.

Agreement: the loss of each of the first steps (same micro-batches, same initial weights) must be within
``tolerance x max(1, |loss of ours|)`` of ours: bf16 on a GPU, fp32 in ``--cpu-smoke``. A contender that
disagrees is marked so and not ranked; the control (labels off by one) must disagree. Figures: real
tokens/s over the timed steps (after ``--warmup``), MFU as ``gpu_check.py`` counts it (useful LoRA FLOPs of
the real tokens against the datasheet bf16 peak), peak allocated memory (model, optimizer and step), and
for ours (with and without gradient checkpointing) `train plan --model`'s estimate of that peak.

Also ``prep pack`` scaling: the same corpus packed with 1, 2, 4, 8 and 16 workers, each timed.
Results go to ``--json`` after every run, so a run cut short keeps what it measured. Exit status 1 when
a contender that ran disagreed, crashed, or the control was not caught. ``--cpu-smoke`` runs every
harness for two steps on a tiny model and the bundled sample, on the CPU (figures meaningless).
Usage: ``python benchmarks/gpu_bench.py --out DIR [--steps 5] [--shapes ...]``; see docs/training.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import gpu_contenders as c  # noqa: E402
from gpu_check import (  # noqa: E402
    PEAK_BF16_TFLOPS,
    SHAPES,
    lora_train_flops_per_token,
    mean_causal_context,
    qwen2_shape,
)

from shared.reader import PackedDataset  # noqa: E402
from train.attention import flash_attn_available  # noqa: E402
from train.memory import estimate_memory, shape_of_config  # noqa: E402
from train.model import tiny_qwen2_config  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DEFAULT_CORPUS = DATA / "corpus" / "reuters21578" / "reuters21578.jsonl"
DEFAULT_TOKENIZER = DATA / "qwen2.5-tokenizer"

TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-5}
"""Allowed |loss - loss of ours| / max(1, |loss of ours|) per compared step. bf16 kernels differ in
rounding order; in fp32 every contender computes the same sums and may differ only by round-off."""
COMPARED_STEPS = 3
"""Losses compared: the first steps, the first on the initial weights, the next after AdamW updates."""
REFERENCE = "ours"
GRAD_CKPT = "ours_grad_ckpt"
CONTROL = "control_wrong_labels"


def contenders(framework_attn: str) -> list[tuple[str, object, str | None, str]]:
    """(name, run(work, clock), why it cannot run here or None, attention) in running order.

    Ours runs first: it is the reference of the agreement check. Liger, which patches transformers'
    Qwen2 module (restored after it), runs after every plain HF contender; compiling, the slowest to
    start, runs last, so that a run cut short by its time limit loses the least.
    """
    cuda = torch.cuda.is_available()
    ours_attn = "torch_varlen" if cuda else "sdpa reference (stands in for torch_varlen on CPU)"
    no_flash = None if cuda and flash_attn_available() else "flash-attn is not installed (or not on CUDA)"
    return [
        (REFERENCE, c.ours, None, ours_attn),
        ("ours_flash_attn", c.ours_flash_attn, no_flash, "flash_attn"),
        (GRAD_CKPT, c.ours_grad_ckpt, None, ours_attn),
        ("ours_unfused", c.ours_unfused, None, ours_attn),
        ("hf_flatten_sdpa", lambda w, k: c.hf_flatten(w, k, "sdpa"), None, "sdpa"),
        (
            "hf_flatten_fa2",
            lambda w, k: c.hf_flatten(w, k, "flash_attention_2"),
            c.hf_missing("flash_attention_2"),
            "flash_attention_2",
        ),
        ("hf_flatten_varlen", lambda w, k: c.hf_flatten(w, k, "varlen"), None, "varlen"),
        ("hf_trainer", lambda w, k: c.hf_trainer(w, k, framework_attn), c.trainer_missing(), framework_attn),
        ("trl_sft", lambda w, k: c.trl_sft(w, k, framework_attn), c.trl_missing(), framework_attn),
        (CONTROL, c.control_wrong_labels, None, ours_attn),
        ("ours_liger", c.ours_liger, c.liger_missing(), ours_attn),
        ("ours_compile", c.ours_compile, None, ours_attn),
    ]


def versions() -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "accelerate", "trl", "datasets", "liger-kernel", "flash-attn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# --- data ----------------------------------------------------------------------------------------------


def pack(corpus: Path, tokenizer: Path, out: Path, seq_len: int, workers: int, cache: Path) -> float:
    """Run ``prep pack`` as a user does, in a child process; return its wall time in seconds."""
    env = {
        **os.environ,
        "PREP_FAST_BPE_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
    }
    command = [sys.executable, "-m", "prep.cli", "pack", str(corpus), "--tokenizer", str(tokenizer)]
    command += ["--out", str(out), "--seq-len", str(seq_len), "--workers", str(workers), "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"prep pack failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def prep_scaling(corpus: Path, tokenizer: Path, work: Path, seq_len: int, workers: list[int]) -> dict:
    """Wall time of ``prep pack`` on ``corpus`` per worker count; the fast engine's cache is warm for all."""
    runs = []
    for n in workers:
        out = work / f"scaling-{n}"
        seconds = pack(corpus, tokenizer, out, seq_len, n, work / "bpe-cache")
        num_tokens = PackedDataset(out, verify="none").manifest.splits["train"].num_tokens
        runs.append({"workers": n, "seconds": seconds, "num_tokens": num_tokens})
        print(
            f"prep pack {corpus.name} --workers {n:>2}: {seconds:6.2f} s, {num_tokens / seconds:,.0f} tok/s"
        )
    for r in runs:
        r["speedup_vs_first"] = runs[0]["seconds"] / r["seconds"]
    return {"corpus": corpus.name, "seq_len": seq_len, "cpu_count": os.cpu_count(), "runs": runs}


def micro_batches(data: Path, tokens_per_batch: int, num_steps: int) -> list:
    """``num_steps`` micro-batches of whole packed rows, spread evenly over the train split."""
    split = PackedDataset(data, verify="size").split("train")
    seq_len = int(split.row_lengths().max())
    rows_per_batch = max(1, tokens_per_batch // seq_len)
    needed = rows_per_batch * num_steps
    if split.num_rows < needed:
        raise SystemExit(
            f"`{data}` has {split.num_rows} rows; {needed} are needed. Lower --tokens-per-batch."
        )
    picks = np.linspace(0, split.num_rows - 1, needed).astype(int).tolist()
    rows = [split.row(i) for i in picks]
    return [rows[i : i + rows_per_batch] for i in range(0, needed, rows_per_batch)]


# --- runs ----------------------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_one(name: str, fn, work: c.Work, warmup: int, peak_tflops: float | None) -> dict:
    """One contender on one shape: its losses, and its figures over the steps after ``warmup``."""
    _free(work.device)
    clock = c.StepClock(warmup, work.num_steps, work.device)
    try:
        losses = [float(x) for x in fn(work, clock)]
    except torch.OutOfMemoryError:
        _free(work.device)
        return {"status": "out_of_memory"}
    except Exception as error:  # one broken contender must not hide the others' figures
        traceback.print_exc()
        _free(work.device)
        return {"status": "failed", "error": f"{type(error).__name__}: {str(error)[:500]}"}
    timed = [r for rows in work.micro_batches[warmup:] for r in rows]
    num_tokens = sum(r.num_tokens for r in timed)
    lengths = [int(n) for r in timed for n in np.diff(r.cu_seqlens)]
    flops = lora_train_flops_per_token(work.config, mean_causal_context(lengths))
    seconds = clock.seconds
    result = {"status": "ok", "losses": losses, "seconds": seconds, "timed_tokens": num_tokens}
    if seconds:
        tflops = num_tokens / seconds * flops / 1e12
        result |= {
            "tokens_per_s": num_tokens / seconds,
            "step_ms": 1000 * seconds / (work.num_steps - warmup),
            "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
        }
    if work.device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if name in (REFERENCE, GRAD_CKPT):  # `train plan --model`'s estimate of this step, to check the peak
        result["estimate_gib"] = memory_estimate_gib(work, grad_checkpointing=name == GRAD_CKPT)
    return result


def memory_estimate_gib(work: c.Work, *, grad_checkpointing: bool) -> float:
    """`train.memory.estimate_memory` for ours on ``work``: LoRA, bf16 (fp32 on the CPU smoke run), the
    largest micro-batch's tokens."""
    tokens = max(sum(r.num_tokens for r in rows) for rows in work.micro_batches)
    precision = "bf16" if work.device.type == "cuda" else "fp32"
    shape = shape_of_config(work.config, name="bench")
    estimate = estimate_memory(
        shape, tokens=tokens, lora_r=c.LORA.r, precision=precision, grad_checkpointing=grad_checkpointing
    )
    return estimate.total / 2**30


def judge(result: dict, reference: dict | None, tolerance: float) -> None:
    """Add ``loss_max_rel_diff`` and ``agrees`` to ``result``, comparing its first losses with ours."""
    if result.get("status") != "ok" or not reference or reference.get("status") != "ok":
        return
    pairs = list(zip(result["losses"], reference["losses"], strict=False))[:COMPARED_STEPS]
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in pairs)
    result["loss_max_rel_diff"] = worst
    result["compared_steps"] = len(pairs)
    result["agrees"] = bool(worst <= tolerance)


def print_table(shape: str, runs: dict) -> None:
    ours = runs.get(REFERENCE, {}).get("tokens_per_s")
    print(f"\n{shape}: contenders that agree with ours, fastest first; then the others")
    ranked = sorted(
        (n for n, r in runs.items() if r.get("agrees") and "tokens_per_s" in r and n != CONTROL),
        key=lambda n: -runs[n]["tokens_per_s"],
    )
    for name in ranked + [n for n in runs if n not in ranked]:
        r = runs[name]
        if r.get("status") != "ok":
            why = r.get("why") or r.get("error") or r["status"]
            print(f"  {name:>22}: {r['status'].replace('_', ' ')}: {why}")
            continue
        verdict = "agrees" if r.get("agrees") else "DISAGREES (not ranked)"
        if name == CONTROL:
            verdict = "negative control " + (
                "rejected, as it must be" if not r.get("agrees") else "NOT REJECTED"
            )
        speed = ""
        if "tokens_per_s" in r:
            mfu = f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "MFU n/a"
            peak = f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
            if "estimate_gib" in r:
                peak += f" (train plan estimate {r['estimate_gib']:.1f} GiB)"
            ratio = f" ({r['tokens_per_s'] / ours:.2f}x ours)" if ours else ""
            speed = f"{r['tokens_per_s']:>10,.0f} tok/s{ratio}, {r['step_ms']:.0f} ms/step, {mfu}{peak}; "
        print(f"  {name:>22}: {speed}loss diff {r.get('loss_max_rel_diff', float('nan')):.2e} -> {verdict}")


def verdict(report: dict) -> bool:
    """True when every contender that ran agreed with ours and the control was caught, on every shape."""
    ok = True
    for runs in report["runs"].values():
        for name, r in runs.items():
            if r.get("status") == "not_available":
                continue
            if name == CONTROL:
                ok &= r.get("agrees") is False
            else:
                ok &= r.get("status") == "ok" and (name == REFERENCE or r.get("agrees") is True)
    return ok


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for packed data and the JSON")
    parser.add_argument("--json", type=Path, help="the results file (default OUT/gpu_bench.json)")
    parser.add_argument("--data", type=Path, help="packed shards to train on (default: pack --corpus)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--seq-len", type=int, default=4096, help="packed row length when packing here")
    parser.add_argument("--tokens-per-batch", type=int, default=16384, help="tokens per optimizer step")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--only", help="comma-separated contenders to run (default all)")
    parser.add_argument(
        "--framework-attn",
        default=None,
        help="attention of hf_trainer and trl_sft: sdpa, flash_attention_2 or varlen (default: the fastest"
        " available: flash_attention_2 with flash-attn, else varlen)",
    )
    parser.add_argument(
        "--prep-workers", default="1,2,4,8,16", help="worker counts for prep scaling; '' skips"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="every harness, 2 steps, tiny model, CPU")
    args = parser.parse_args()
    if args.cpu_smoke:
        from prep.sample import write_sample

        args.out.mkdir(parents=True, exist_ok=True)
        args.corpus, args.tokenizer = write_sample(args.out / "sample")
        args.seq_len, args.tokens_per_batch, args.warmup, args.steps = 256, 512, 1, 1
        args.prep_workers = "1,2" if args.prep_workers else ""
        args.shapes = "tiny"
    return args


def _new_report(args: argparse.Namespace, device: torch.device, framework_attn: str) -> dict:
    """The results record before any run: date, device, versions and the settings every contender shares."""
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU SMOKE RUN (figures meaningless)"
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    peak = (
        next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if device.type == "cuda" else None
    )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "versions": versions(),
        "settings": {
            "tokens_per_batch": args.tokens_per_batch,
            "seq_len": args.seq_len,
            "warmup": args.warmup,
            "steps": args.steps,
            "lr": args.lr,
            "lora": {"r": c.LORA.r, "alpha": c.LORA.alpha},
            "dtype": dtype,
            "tolerance": TOLERANCE[dtype],
            "compared_steps": COMPARED_STEPS,
            "framework_attn": framework_attn,
            "peak_tflops_datasheet": peak,
        },
        "runs": {},
    }


def _run_contenders(args, report: dict, data: Path, device: torch.device, framework_attn: str, save) -> None:
    """Every contender on every shape, on the same micro-batches; each result judged against ours."""
    dtype, peak = report["settings"]["dtype"], report["settings"]["peak_tflops_datasheet"]
    manifest = PackedDataset(data, verify="none").manifest
    tokenizer_file = Path(manifest.tokenizer.path)
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / "tokenizer.json"
    batches = micro_batches(data, args.tokens_per_batch, args.warmup + args.steps)
    report["settings"]["rows_per_batch"] = len(batches[0])
    report["settings"]["tokens_per_step"] = [sum(r.num_tokens for r in rows) for rows in batches]
    wanted = set(args.only.split(",")) if args.only else None
    for contender, fn, missing, attn in contenders(framework_attn):
        if wanted and contender not in wanted | {REFERENCE}:
            continue
        for shape in args.shapes.split(","):
            config = (
                tiny_qwen2_config(manifest.tokenizer.vocab_size) if shape == "tiny" else qwen2_shape(shape)
            )
            runs = report["runs"].setdefault(shape, {})
            if missing:
                runs[contender] = {"status": "not_available", "why": missing, "attention": attn}
                print(f"{shape} {contender}: not available: {missing}")
                continue
            work = c.Work(
                config=config,
                micro_batches=batches,
                device=device,
                lr=args.lr,
                tokenizer_file=tokenizer_file,
                eos_token=manifest.tokenizer.eos_token,
                compile_backend="aot_eager" if device.type == "cpu" else "inductor",
            )
            start = time.perf_counter()
            result = run_one(contender, fn, work, args.warmup, peak) | {"attention": attn}
            # Ours is compared with itself, which makes it the zero of the table.
            judge(result, runs.get(REFERENCE, result), TOLERANCE[dtype])
            runs[contender] = result
            losses = ", ".join(f"{x:.5f}" for x in result.get("losses", []))
            print(
                f"{shape} {contender}: {result['status']} in {time.perf_counter() - start:.0f} s; losses {losses}"
            )
            save()


def main() -> int:
    args = _arguments()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "gpu_bench.json"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    framework_attn = args.framework_attn or (
        "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "varlen"
    )
    report = _new_report(args, device, framework_attn)
    print(f"== gpu_bench: {report['device']}, {report['settings']['dtype']} ==")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")

    data = args.data
    if data is None:
        data = args.out / "packed"
        seconds = pack(
            args.corpus, args.tokenizer, data, args.seq_len, os.cpu_count() or 1, args.out / "bpe-cache"
        )
        print(f"packed {args.corpus} at {args.seq_len} in {seconds:.1f} s -> {data}")
    workers = [int(n) for n in args.prep_workers.split(",") if n]
    if workers:
        report["prep_scaling"] = prep_scaling(args.corpus, args.tokenizer, args.out, args.seq_len, workers)
        save()
    _run_contenders(args, report, data, device, framework_attn, save)
    for shape, runs in report["runs"].items():
        print_table(shape, runs)
    report["all_agree"] = verdict(report)
    save()
    print(
        f"\n{'every contender that ran agreed; the control was caught' if report['all_agree'] else 'AGREEMENT CHECK FAILED'}"
    )
    print(f"results: {json_path}")
    return 0 if report["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
