"""Where a LoRA varlen training step spends its time on a GPU: kernels by CUDA time, and GPU busy vs wall.

Builds the Qwen2-0.5B-shaped model of ``gpu_check.py`` with LoRA, runs warm-up steps on one varlen
micro-batch, then profiles a few steps with ``torch.profiler`` and prints the top operators by CUDA
time and by CPU time. If the GPU's busy time is far below the wall time, the step is bound by Python
and kernel launches, not by arithmetic. Usage: ``python benchmarks/gpu_profile.py [--tokens 16384]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_check import VOCAB, doc_lengths, micro_batches, qwen2_shape, varlen_batch  # noqa: E402

from train.loss import micro_batch_loss_sum  # noqa: E402
from train.model import LoraSettings, forward_hidden, model_from_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the micro-batch")
    parser.add_argument("--shape", default="qwen2-0.5b-shape")
    parser.add_argument("--attn", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu runs the code paths only (slow)")
    args = parser.parse_args()
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = model_from_config(qwen2_shape(args.shape), attn=args.attn, lora=LoraSettings(), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    lengths = micro_batches(doc_lengths(4000, seed=1), args.tokens)[0]
    batch = varlen_batch(lengths, VOCAB, seed=0, device=device)

    def step() -> None:
        (micro_batch_loss_sum(model, batch) / batch.num_target_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(label: str, fn, n: int = 5) -> None:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        ms = 1000 * (time.perf_counter() - start) / n
        print(f"{label:>28}: {ms:7.1f} ms  ({batch.num_tokens / ms * 1000:,.0f} tok/s)")

    def step_with_chunk(chunk_tokens: int) -> None:
        loss = micro_batch_loss_sum(model, batch, chunk_tokens=chunk_tokens)
        (loss / batch.num_target_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    timed("full step", step)
    for chunk in (4096, 16384):
        timed(f"full step, loss chunk {chunk}", lambda c=chunk: step_with_chunk(c))
    with torch.no_grad():
        timed("decoder forward, no grad", lambda: forward_hidden(model, batch))
        timed("forward + loss, no grad", lambda: micro_batch_loss_sum(model, batch))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events) / args.steps
    print(f"\nGPU busy per step (sum of kernel self time): {busy_us / 1000:.1f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
