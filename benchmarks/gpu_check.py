"""Check the fast varlen attention backends against the SDPA reference, and measure their speed and memory.

CPU part (runs anywhere): ``tiny-qwen2`` in fp32 with the ``sdpa`` reference. A packed row against each
of its documents run alone (max |logit difference|), the naive packed forward (one causal mask over
the row) as the negative control the isolation check must reject, and the loss of the packed row
against the sum of the documents' losses.

GPU part (CUDA only), in bf16 autocast:

1. Agreement: each available fast backend (``flash_attn``, ``torch_varlen``) against ``sdpa`` on the
   same weights and batch, for a Qwen2-0.5B-shaped random model: max |difference| of final hidden
   states and of logits, and the relative difference of the LoRA gradients of the loss.
2. Isolation: ``train check``'s comparison (packed row vs each document alone) with each backend, and
   the naive negative control.
3. Throughput: LoRA (r=32) training steps of Qwen2-0.5B- and 1.5B-shaped random models on the same
   documents, run varlen (each backend) and padded (one document per row, HF ``sdpa`` with a 2D
   padding mask), at each ``--tokens-per-batch``. Real (non-padding) tokens per second, MFU (useful
   LoRA FLOPs against the datasheet bf16 peak; the measured matmul peak is printed beside it) and peak
   memory, side by side; a mode that runs out of memory is recorded as such.
4. No host syncs in a step: `train run`'s own loop (`train.loop.train`, tiny-qwen2 with LoRA on the
   bundled sample, ``--attn auto``) for three log windows, under ``torch.cuda.set_sync_debug_mode
   ("error")`` from the start of every step between log points of the last two windows to the end of
   its ``log_step`` (the first window is warm-up: one-time initialisation may sync). A sync raises there
   and is reported with its step and stack; the log points read, and sync, by design. The CPU smoke run
   takes the same steps unchecked (``tests/train/test_host_reads.py`` counts reads on the CPU).

A part that crashes is recorded and counted as a failed check; the parts after it still run.
Benchmarks are not tests: timings are printed, never asserted. The exit status is 1 when a
correctness check fails, else 0. Usage: ``python benchmarks/gpu_check.py [--steps N]
[--tokens-per-batch 8192,16384] [--json out.json]``; ``benchmarks/gpu_check.sh`` runs it and then the
CLI end to end.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.contract import IGNORE_INDEX  # noqa: E402
from train.attention import flash_attn_available, implementation_name, torch_varlen_available  # noqa: E402
from train.batch import VarlenBatch  # noqa: E402
from train.check import RELATIVE_TOLERANCE  # noqa: E402
from train.isolation import compare_row, segment_batch  # noqa: E402
from train.loss import chunked_cross_entropy_sum, micro_batch_loss_sum  # noqa: E402
from train.model import (  # noqa: E402
    LoraSettings,
    autocast_for,
    causal_lm,
    forward_hidden,
    model_from_config,
    output_head,
    tiny_qwen2_config,
)

SHAPES = {
    "qwen2-0.5b-shape": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14
    ),
    "qwen2-1.5b-shape": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12
    ),
}
"""Qwen2/Qwen2.5 0.5B and 1.5B dimensions (both: 2 key/value heads, tied embeddings; vocabulary `VOCAB`)."""


DEVICE = "cuda"
"""Where the GPU part runs; `--cpu-smoke` sets cpu (with tiny shapes) to exercise its code without a GPU."""
VOCAB = 151936
"""Qwen2's vocabulary; the smoke run shrinks it, since the output head dominates a tiny model on CPU."""


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def qwen2_shape(name: str) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        use_cache=False,
        **SHAPES[name],
    )


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks from the vendors' datasheets, by a substring of the device name."""


def forward_flops_per_token(config: Qwen2Config, mean_context: float) -> float:
    """Matmul FLOPs of one token's forward pass: projections, MLP, attention scores and the output head.

    ``mean_context`` is the average number of keys a query attends to: (n + 1) / 2 for a causal
    document of n tokens, averaged over tokens. Padding is not counted: these are the useful FLOPs.
    """
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * 2 * d * mean_context
    return L * per_layer + 2 * d * config.vocab_size


def lora_train_flops_per_token(config: Qwen2Config, mean_context: float) -> float:
    """A LoRA step: the forward, and a backward that computes input gradients only (frozen weights).

    That is 2x the forward; the usual 6N convention (3x) assumes every weight gets a gradient, which
    LoRA's frozen base does not. The adapters' own FLOPs (rank 32) are under 1% and left out.
    """
    return 2 * forward_flops_per_token(config, mean_context)


def mean_causal_context(lengths: list[int]) -> float:
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / total


def peak_tflops() -> tuple[float | None, float | None]:
    """(datasheet dense bf16 peak, measured 8192^3 bf16 matmul rate) in TFLOP/s; None off CUDA."""
    if DEVICE != "cuda":
        return None, None
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync()
    measured = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    del a, b
    return sheet, measured


def doc_lengths(num_docs: int, seed: int, max_len: int = 1024) -> list[int]:
    """Lengths like a news corpus: log-normal around 200 tokens, clipped to [16, max_len]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(200), 0.8, num_docs), 16, max_len).astype(int).tolist()


def varlen_batch(lengths: list[int], vocab_size: int, seed: int, device) -> VarlenBatch:
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    input_ids = torch.randint(0, vocab_size, (1, num_tokens), generator=gen)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    labels = input_ids.clone()
    labels[0, cu[:-1].long()] = IGNORE_INDEX
    batch = VarlenBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        num_target_tokens=int((labels != IGNORE_INDEX).sum()),
    )
    return batch.to(device)


def micro_batches(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Documents in order, cut into micro-batches of at most ``tokens_per_batch`` tokens."""
    groups, current = [], []
    for n in lengths:
        if current and sum(current) + n > tokens_per_batch:
            groups.append(current)
            current = []
        current.append(n)
    return groups + ([current] if current else [])


CPU_TOLERANCE = 1e-9
"""Relative tolerance of the CPU part, which runs in float64: round-off there is far below any leak, on any
CPU. In float32 a packed row and its segments alone usually agree bitwise, but not always (different
kernel paths), so a float32 tolerance would make this check depend on the machine."""


def cpu_part() -> bool:
    """Reference vs naive on tiny-qwen2 (float64): the isolation check must pass one and reject the other."""
    print("== CPU part: tiny-qwen2, float64, sdpa reference ==")
    model = model_from_config(tiny_qwen2_config(1000), attn="sdpa", device="cpu").eval().double()
    lengths = [37, 120, 64, 15, 90]
    batch = varlen_batch(lengths, 1000, seed=0, device="cpu")
    tol = CPU_TOLERANCE
    varlen_diff, scale = compare_row(model, batch)
    naive_diff, naive_scale = compare_row(model, batch, naive=True)
    with torch.no_grad():
        packed = micro_batch_loss_sum(model, batch).item()
        bounds = batch.cu_seqlens.tolist()
        alone = sum(
            micro_batch_loss_sum(model, segment_batch(batch, a, b)).item()
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        )
    ok_varlen = varlen_diff <= tol * max(1.0, scale)
    ok_naive = naive_diff > tol * max(1.0, naive_scale)
    ok_loss = abs(packed - alone) <= 1e-5 * abs(alone)
    print(
        f"varlen (sdpa reference): max |dlogit| packed vs alone = {varlen_diff:.3g}  -> {_verdict(ok_varlen)}"
    )
    print(
        f"naive packed forward (negative control): max |dlogit| = {naive_diff:.3g}  -> "
        f"{'rejected, as it must be' if ok_naive else 'NOT REJECTED (check is broken)'}"
    )
    print(f"loss: packed row {packed:.6f} vs sum of documents alone {alone:.6f}  -> {_verdict(ok_loss)}")
    return ok_varlen and ok_naive and ok_loss


def _verdict(ok: bool) -> str:
    return "ok" if ok else "FAIL"


@torch.no_grad()
def agreement(backends: list[str], lengths: list[int]) -> tuple[bool, dict]:
    """Each fast backend's hidden states and logits against the sdpa reference, same weights, bf16."""
    model = model_from_config(
        qwen2_shape("qwen2-0.5b-shape"), attn="sdpa", device=DEVICE, dtype=torch.bfloat16
    )
    model.eval()
    batch = varlen_batch(lengths, VOCAB, seed=1, device=DEVICE)
    base = causal_lm(model)
    ref = forward_hidden(model, batch)[0]
    head = output_head(model)
    ok, report = True, {}
    for backend in backends:
        base.set_attn_implementation(implementation_name(backend, DEVICE))
        fast = forward_hidden(model, batch)[0]
        logit_diff, scale = 0.0, 0.0
        for lo in range(0, batch.num_tokens, 1024):
            with autocast_for(torch.device(DEVICE)):
                a, b = head(ref[lo : lo + 1024]).float(), head(fast[lo : lo + 1024]).float()
            logit_diff = max(logit_diff, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
        hidden_diff = (ref.float() - fast.float()).abs().max().item()
        passed = logit_diff <= RELATIVE_TOLERANCE["bfloat16"] * max(1.0, scale)
        ok &= passed
        report[backend] = {
            "hidden_max_abs_diff": hidden_diff,
            "logit_max_abs_diff": logit_diff,
            "logit_scale": scale,
            "relative_tolerance": RELATIVE_TOLERANCE["bfloat16"],
            "passed": passed,
        }
        print(
            f"{backend} vs sdpa: max |dhidden| {hidden_diff:.3g}, max |dlogit| {logit_diff:.3g}"
            f" (|logit| up to {scale:.3g})  -> {_verdict(passed)}"
        )
        base.set_attn_implementation(implementation_name("sdpa", DEVICE))
    return ok, report


GRAD_RELATIVE_TOLERANCE = 5e-2
"""Allowed ||grad(fast) - grad(sdpa)|| / ||grad(sdpa)|| over the LoRA weights, in bf16."""


def gradient_agreement(backends: list[str], lengths: list[int]) -> tuple[bool, dict]:
    """LoRA gradients of the summed loss with each fast backend against the sdpa reference."""
    model = model_from_config(
        qwen2_shape("qwen2-0.5b-shape"), attn="sdpa", lora=LoraSettings(), device=DEVICE
    )
    # lora_B starts at zero, which would leave lora_A without gradient; give it values to compare.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = varlen_batch(lengths, VOCAB, seed=3, device=DEVICE)

    def grads(backend: str) -> torch.Tensor:
        causal_lm(model).set_attn_implementation(implementation_name(backend, DEVICE))
        loss = micro_batch_loss_sum(model, batch) / batch.num_target_tokens
        return torch.cat([g.float().flatten() for g in torch.autograd.grad(loss, params)])

    ref = grads("sdpa")
    ok, report = True, {}
    for backend in backends:
        rel = ((grads(backend) - ref).norm() / ref.norm()).item()
        passed = rel <= GRAD_RELATIVE_TOLERANCE
        ok &= passed
        report[backend] = {
            "lora_grad_relative_diff": rel,
            "tolerance": GRAD_RELATIVE_TOLERANCE,
            "passed": passed,
        }
        print(f"{backend} vs sdpa: LoRA gradients differ by {rel:.3g} (relative L2)  -> {_verdict(passed)}")
    return ok, report


@torch.no_grad()
def isolation(backends: list[str], lengths: list[int]) -> tuple[bool, dict]:
    """`train check`'s comparison with each backend in bf16, and the naive control."""
    model = model_from_config(tiny_qwen2_config(VOCAB), attn="sdpa", device=DEVICE).eval()
    batch = varlen_batch(lengths, VOCAB, seed=2, device=DEVICE)
    tol = RELATIVE_TOLERANCE["bfloat16"]
    ok, report = True, {}
    for backend in dict.fromkeys([*backends, "sdpa"]):
        causal_lm(model).set_attn_implementation(implementation_name(backend, DEVICE))
        diff, scale = compare_row(model, batch)
        naive, naive_scale = compare_row(model, batch, naive=True)
        passed, caught = diff <= tol * max(1.0, scale), naive > tol * max(1.0, naive_scale)
        ok &= passed and caught
        report[backend] = {
            "packed_vs_alone": diff,
            "naive_control": naive,
            "relative_tolerance": tol,
            "passed": passed,
            "naive_rejected": caught,
        }
        print(
            f"isolation {backend}: packed vs alone {diff:.3g} -> {_verdict(passed)}; naive control {naive:.3g}"
            f" -> {'rejected' if caught else 'NOT REJECTED'}"
        )
    return ok, report


def _set_sync_debug_mode(mode: str) -> None:
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def no_sync_steps(log_every: int = 3) -> tuple[bool, dict]:
    """Steps of `train run` between log points under the CUDA sync debug mode (module docstring, 4):
    passed when none synchronised; else the first sync's step and stack."""
    import tempfile

    import train.loop as loop
    from prep.pipeline import PackConfig, pack
    from prep.sample import write_sample
    from train.config import RunConfig

    num_steps = 3 * log_every
    taken: list[int] = []
    checked: list[int] = []
    train_step, log_step = loop.train_step, loop.log_step

    def watched_train_step(run):
        taken.append(run.start_step + len(taken) + 1)
        if taken[-1] > log_every and taken[-1] % log_every:  # between log points, after warm-up
            checked.append(taken[-1])
            _set_sync_debug_mode("error")
        return train_step(run)

    def watched_log_step(run, step, stats):
        log_step(run, step, stats)
        _set_sync_debug_mode("default")

    report: dict = {"steps": num_steps, "log_every": log_every, "sync_debug_mode": DEVICE == "cuda"}
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tokenizer = write_sample(Path(tmp) / "sample", num_docs=200)
        pack(
            PackConfig(inputs=(str(corpus),), tokenizer=str(tokenizer), out=Path(tmp) / "packed", seq_len=512)
        )
        cfg = RunConfig(
            data=Path(tmp) / "packed",
            out=Path(tmp) / "run",
            model="tiny-qwen2",
            device=DEVICE,
            attn="auto",
            batch_size=2,
            grad_accum=2,
            max_steps=num_steps,
            log_every=log_every,
            eval_every=0,
            tensorboard=False,
        )
        loop.train_step, loop.log_step = watched_train_step, watched_log_step
        try:
            loop.train(cfg, log=lambda line: print(f"  {line}"))
        except RuntimeError as error:
            if "synchroniz" not in str(error):
                raise
            report["sync"] = {"step": taken[-1], "error": str(error), "stack": traceback.format_exc()}
            print(f"step {taken[-1]} synchronised between log points:\n{traceback.format_exc()}")
        finally:
            _set_sync_debug_mode("default")
            loop.train_step, loop.log_step = train_step, log_step
    report["checked_steps"] = checked
    ok = "sync" not in report and len(taken) == num_steps
    report["passed"] = ok if DEVICE == "cuda" else None
    verdict = _verdict(ok) if DEVICE == "cuda" else "ran (no CUDA: syncs not checked)"
    print(f"no host syncs between log points (steps {checked}): {verdict}")
    return ok, report


def _padded_loss(model, lengths: list[int], batch: VarlenBatch) -> torch.Tensor:
    """The same documents one per row, right-padded, through HF attention with a 2D padding mask."""
    rows = torch.split(batch.input_ids[0], lengths)
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=DEVICE)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=DEVICE)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=DEVICE)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], mask[i, : len(row)], labels[i, 1 : len(row)] = row, 1, row[1:]
    with autocast_for(torch.device(DEVICE)):
        hidden = causal_lm(model).get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False)
        # Each row's first label is -100, so flattening never pairs a row's end with the next row.
        loss, _ = chunked_cross_entropy_sum(hidden.last_hidden_state, output_head(model), labels)
    return loss


def _train_step(model, optimizer, mode: str, lengths: list[int], batch: VarlenBatch) -> int:
    """One LoRA optimizer step on one micro-batch; returns the real tokens it trained on."""
    loss = _padded_loss(model, lengths, batch) if mode == "padded" else micro_batch_loss_sum(model, batch)
    (loss / batch.num_target_tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch.num_tokens


def _time_steps(step, steps: int, flops_per_token: float, peak: float | None) -> dict:
    """Two warm-up steps (kernels, allocator, autotuning), then ``steps`` timed ones."""
    for i in range(2):
        step(i)
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, num_tokens = time.perf_counter(), 0
    for i in range(steps):
        num_tokens += step(i)
    _sync()
    seconds = time.perf_counter() - start
    tokens_per_s = num_tokens / seconds
    return {
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * seconds / steps,
        "tflops": tokens_per_s * flops_per_token / 1e12,
        "mfu": tokens_per_s * flops_per_token / 1e12 / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan"),
    }


def throughput(
    shape: str, modes: list[str], lengths: list[int], steps: int, tokens_per_batch: int, peak: float | None
) -> dict:
    """Tokens/s, MFU and peak memory of LoRA training steps for each mode, on the same micro-batches.

    MFU counts the useful FLOPs of the real tokens (`lora_train_flops_per_token`) against ``peak``
    TFLOP/s, so padded rows score lower for the work they waste.
    """
    config = qwen2_shape(shape)
    model = model_from_config(config, attn="sdpa", lora=LoraSettings(), device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    groups = micro_batches(lengths, tokens_per_batch)
    batches = [varlen_batch(g, VOCAB, seed=i, device=DEVICE) for i, g in enumerate(groups)]
    used = [groups[i % len(groups)] for i in range(steps)]
    flops_per_token = lora_train_flops_per_token(config, mean_causal_context([n for g in used for n in g]))
    results = {}
    for mode in modes:
        causal_lm(model).set_attn_implementation(
            "sdpa" if mode == "padded" else implementation_name(mode, DEVICE)
        )

        def step(i: int, mode: str = mode) -> int:
            return _train_step(model, optimizer, mode, groups[i % len(groups)], batches[i % len(batches)])

        try:
            results[mode] = _time_steps(step, steps, flops_per_token, peak)
        except torch.OutOfMemoryError:  # padding can need several times the memory: say so, go on
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            results[mode] = {"out_of_memory": True}
            print(f"{shape} @{tokens_per_batch} tok/batch {mode:>12}: out of GPU memory")
    base = next((r["tokens_per_s"] for r in results.values() if "tokens_per_s" in r), None)
    for mode, r in results.items():
        if "tokens_per_s" not in r:
            continue
        mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a"
        print(
            f"{shape} @{tokens_per_batch} tok/batch {mode:>12}: {r['tokens_per_s']:>10,.0f} tok/s"
            f" ({r['tokens_per_s'] / base:.2f}x), {r['step_ms']:.0f} ms/step, {r['tflops']:.0f} TFLOP/s,"
            f" {mfu}, peak {r['peak_gib']:.1f} GiB"
        )
    return results


def _section(report: dict, key: str, fn, *args) -> bool:
    """Run one part; a crash is recorded and counted as a failed check, and the next part still runs."""
    try:
        ok, report[key] = fn(*args)
        return ok
    except Exception as error:  # a broken backend must not hide the figures of the others
        traceback.print_exc()
        report[key] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{key}: CRASHED ({type(error).__name__}: {error})")
        return False
    finally:
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def gpu_part(steps: int, batch_sizes: list[int], shapes: list[str]) -> tuple[bool, dict]:
    name = (
        torch.cuda.get_device_name()
        if DEVICE == "cuda"
        else "CPU SMOKE RUN (code paths only, figures meaningless)"
    )
    print(f"\n== GPU part: {name}, bf16 autocast ==")
    backends = [
        b
        for b, ok in (("flash_attn", flash_attn_available()), ("torch_varlen", torch_varlen_available()))
        if ok
    ]
    missing = {"flash_attn", "torch_varlen"} - set(backends)
    if DEVICE != "cuda":
        backends = ["sdpa"]  # stands in for the fast kernels so that every loop below runs
        print("smoke run: `sdpa` stands in for flash_attn and torch_varlen")
    elif missing:
        print(f"not run: {', '.join(sorted(missing))} (not installed in this environment)")
    if not backends:
        print("no fast varlen backend available; only the sdpa reference runs on this GPU")
    sheet, measured = peak_tflops()
    report = {"device": name, "backends": backends, "not_installed": sorted(missing)}
    report["peak_tflops"] = {"datasheet_dense_bf16": sheet, "measured_matmul_8192_bf16": measured}
    if measured:
        print(f"bf16 peak: datasheet {sheet} TFLOP/s, measured 8192^3 matmul {measured:.0f} TFLOP/s")
    lengths = doc_lengths(40, seed=0)
    ok = _section(report, "agreement", agreement, backends, lengths)
    ok &= _section(report, "gradients", gradient_agreement, backends, lengths)
    ok &= _section(report, "isolation", isolation, backends, lengths[:12])
    ok &= _section(report, "no_sync", no_sync_steps)
    report["throughput"] = {}
    all_lengths = doc_lengths(4000, seed=1)
    modes = [*dict.fromkeys([*backends, "sdpa"]), "padded"]
    for shape in shapes:
        for size in batch_sizes:
            key = f"{shape}@{size}"
            _section(
                report["throughput"],
                key,
                lambda s=shape, n=size: (True, throughput(s, modes, all_lengths, steps, n, sheet)),
            )
    return ok, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=10, help="timed optimizer steps per mode (after 2 warm-up)"
    )
    parser.add_argument(
        "--tokens-per-batch",
        default="8192",
        help="tokens per varlen micro-batch; a comma-separated list measures each (default 8192)",
    )
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"model shapes to time (default {','.join(SHAPES)})"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the GPU part's code on the CPU with tiny shapes (catches breakage; figures meaningless)",
    )
    args = parser.parse_args()
    batch_sizes = [int(n) for n in args.tokens_per_batch.split(",")]
    shapes = args.shapes.split(",")
    if args.cpu_smoke:
        global DEVICE, VOCAB
        DEVICE, VOCAB = "cpu", 1000
        tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        for name in SHAPES:
            SHAPES[name] = tiny
        args.steps, batch_sizes = 1, [512]
    report = {"versions": versions(), "cpu_ok": cpu_part()}
    ok = report["cpu_ok"]
    if torch.cuda.is_available() or args.cpu_smoke:
        gpu_ok, report["gpu"] = gpu_part(args.steps, batch_sizes, shapes)
        ok &= gpu_ok
    else:
        print(
            "\nGPU part: NOT RUN (no CUDA device). Not checked here: flash_attn and torch_varlen against"
            " sdpa in bf16, their isolation, tokens/s and peak memory for the 0.5B/1.5B shapes."
        )
    report["all_checks_passed"] = bool(ok)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'all correctness checks passed' if ok else 'A CORRECTNESS CHECK FAILED'}")
    return 0 if ok else 1


def versions() -> dict:
    """The library versions this run used (the GPU machine's image may differ from the project's pins)."""
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "flash_attn", "numpy", "pyarrow"):
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return found


if __name__ == "__main__":
    sys.exit(main())
