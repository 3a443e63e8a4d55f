"""Training-side benchmarks on CPU: the loader's throughput and memory, a packed varlen training step
versus the padded baseline on the same documents, the chunked loss's peak memory versus full logits, and
the fused loss's speed versus the checkpointed one.

Each measurement runs in a fresh child process (``python benchmarks/bench_train.py CHILD ...``) so that
peak memory belongs to it alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, median_run, run_child, self_peak_rss_mib  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
VOCAB = 151_936
"""Qwen2.5's output vocabulary (the embedding matrix, padded past the tokenizer's 151,665 entries)."""


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# -- children ------------------------------------------------------------------------------------------


def child_loader(folder: str, batch_size: int, seconds: float) -> None:
    """Micro-batches from memory-mapped shards: time to first, tokens/s, resident memory."""
    from shared.reader import PackedDataset
    from train.loader import Loader, _HostBuffers, _stage

    rss_start = _rss_mib()
    t0 = time.perf_counter()
    split = PackedDataset(folder).split("train")
    rss_open = _rss_mib()
    loader = Loader(split, batch_size=batch_size, seed=0)
    first = next(loader)
    first_s = time.perf_counter() - t0
    num_tokens, num_batches = first.num_tokens, 1
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        num_tokens += next(loader).num_tokens
        num_batches += 1
    loader_s = time.perf_counter() - start
    loader.close()
    # The assembly alone, into one preallocated buffer set (what the CUDA path pins; CPU cannot pin):
    # the rows' views and the staging, without the prefetch thread's hand-over.
    group = loader.group_size
    order = np.random.default_rng(0).permutation(split.num_rows)[: 64 * group * batch_size].tolist()
    capacity = group * batch_size * int(split.row_lengths().max())
    buffers = _HostBuffers.allocate(capacity, group, pin=False)
    start, assembled = time.perf_counter(), 0
    for lo in range(0, len(order), group * batch_size):
        views = split.views(order[lo : lo + group * batch_size])
        assembled += _stage(views, batch_size, buffers).layout.num_tokens
    assemble_s = time.perf_counter() - start
    dataset_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.arrow"))
    emit(
        {
            "dataset_mib": dataset_bytes / 2**20,
            "time_to_first_batch_s": first_s,
            "loader_tokens_per_s": (num_tokens - first.num_tokens) / loader_s,
            "loader_batches": num_batches,
            "assemble_tokens_per_s": assembled / assemble_s,
            "rss_start_mib": rss_start,
            "rss_after_open_mib": rss_open,
            "rss_end_mib": _rss_mib(),
        }
    )


def _segments(rows) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(doc id, input_ids, labels) of every segment of the packed rows."""
    out = []
    for row in rows:
        cu = row.cu_seqlens.tolist()
        for doc, a, b in zip(row.doc_ids.tolist(), cu[:-1], cu[1:], strict=True):
            out.append((doc, row.input_ids[a:b], row.labels[a:b]))
    return out


def _padded(segments: list[tuple[int, np.ndarray, np.ndarray]], pad_id: int):
    """One document per row, right-padded to the longest in the batch (labels -100 on padding)."""
    import torch

    longest = max(len(s[1]) for s in segments)
    ids = torch.full((len(segments), longest), pad_id, dtype=torch.int64)
    labels = torch.full((len(segments), longest), -100, dtype=torch.int64)
    mask = torch.zeros((len(segments), longest), dtype=torch.int64)
    for r, (_, i, lab) in enumerate(segments):
        ids[r, : len(i)] = torch.from_numpy(i.astype(np.int64))
        labels[r, : len(i)] = torch.from_numpy(lab.astype(np.int64))
        mask[r, : len(i)] = 1
    return ids, labels, mask


def child_train(folder: str, batch_size: int, steps: int, docs_per_padded_batch: int) -> None:
    """Real tokens/s of packed varlen steps versus padded steps over the same documents."""
    import torch

    from shared.reader import PackedDataset
    from train.loader import batch_from_rows
    from train.loss import chunked_cross_entropy_sum, micro_batch_loss_sum
    from train.model import causal_lm, load_model, output_head

    torch.manual_seed(0)
    ds = PackedDataset(folder)
    split = ds.split("train")
    eos = ds.manifest.tokenizer.eos_id
    model = load_model("tiny-qwen2", vocab_size=VOCAB, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Rows chosen at random, as the loader would; the first micro-batch is a warm-up.
    order = np.random.default_rng(0).permutation(split.num_rows)[: (steps + 1) * batch_size]
    row_groups = [
        [split.row(int(i)) for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)
    ]
    batches = [batch_from_rows(rows) for rows in row_groups]

    def packed_step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        (micro_batch_loss_sum(model, batch) / max(batch.num_target_tokens, 1)).backward()
        optimizer.step()

    packed_step(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        packed_step(batch)
    packed_s = time.perf_counter() - start
    real_tokens = sum(b.num_tokens for b in batches[1:])

    # Same documents, one per row: HF's own sdpa attention with a padding mask, same chunked loss.
    lm = causal_lm(model)
    lm.set_attn_implementation("sdpa")
    # A padded pipeline batches documents in corpus order, so lengths mix (taking them row by row from
    # the bfd plan would group similar lengths and flatter the baseline).
    segments = sorted((s for rows in row_groups[1:] for s in _segments(rows)), key=lambda s: s[0])
    groups = [segments[i : i + docs_per_padded_batch] for i in range(0, len(segments), docs_per_padded_batch)]

    def padded_step(group) -> int:
        ids, labels, mask = _padded(group, eos)
        optimizer.zero_grad(set_to_none=True)
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        loss_sum, num_targets = chunked_cross_entropy_sum(hidden, output_head(model), labels)
        (loss_sum / num_targets.clamp(min=1)).backward()
        optimizer.step()
        return ids.numel()

    padded_step(_segments(row_groups[0])[:2])  # warm-up (the sdpa path), on two documents of the warm-up rows
    start, positions = time.perf_counter(), 0
    for group in groups:
        positions += padded_step(group)
    padded_s = time.perf_counter() - start
    emit(
        {
            "real_tokens": real_tokens,
            "num_docs": len(segments),
            "packed_seconds": packed_s,
            "packed_tokens_per_s": real_tokens / packed_s,
            "padded_seconds": padded_s,
            "padded_positions": positions,
            "padded_tokens_per_s": real_tokens / padded_s,
            "padding_share": 1 - real_tokens / positions,
            "speedup": padded_s / packed_s,
        }
    )


def child_loss(num_tokens: int, mode: str) -> None:
    """Peak memory added by one forward+backward of the loss over a 151,936-token vocabulary (fp32)."""
    import torch
    import torch.nn.functional as F

    from train.loss import checkpointed_cross_entropy_sum, chunked_cross_entropy_sum

    torch.manual_seed(0)
    hidden = torch.randn(num_tokens, 64, requires_grad=True)
    head = torch.nn.Linear(64, VOCAB, bias=False)
    labels = torch.randint(0, VOCAB, (num_tokens,))
    before = self_peak_rss_mib()
    start = time.perf_counter()
    if mode == "naive":
        logits = head(hidden[:-1]).float()
        F.cross_entropy(logits, labels[1:], reduction="sum").backward()
    else:
        loss_fn = checkpointed_cross_entropy_sum if mode == "checkpointed" else chunked_cross_entropy_sum
        loss_sum, _ = loss_fn(hidden, head, labels)
        loss_sum.backward()
    emit({"peak_added_mib": self_peak_rss_mib() - before, "seconds": time.perf_counter() - start})


def child_loss_speed(num_tokens: int, dim: int, repeats: int) -> None:
    """Forward + backward of the loss alone, fused versus checkpointed, side by side in this process:
    a frozen head (LoRA) over the real vocabulary, fp32, the default chunk; each side's median."""
    import torch

    from train.loss import checkpointed_cross_entropy_sum, fused_cross_entropy_sum

    sides = {"fused": fused_cross_entropy_sum, "checkpointed": checkpointed_cross_entropy_sum}
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(dim, VOCAB, bias=False).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=dim**-0.5, generator=gen)
    hidden = torch.randn(num_tokens, dim, generator=gen, requires_grad=True)
    labels = torch.randint(0, VOCAB, (num_tokens,), generator=gen)

    def run(name: str, tokens: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        hidden.grad = None
        start = time.perf_counter()
        loss, _ = sides[name](hidden[:tokens], head, labels[:tokens])
        loss.backward()
        return time.perf_counter() - start, loss.detach(), hidden.grad

    for name in sides:  # warm-up on a few tokens: kernels and thread pools, not the big buffers
        run(name, 64)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    results = {}
    for r in range(repeats):
        for name in sides if r % 2 == 0 else reversed(list(sides)):  # alternate which side runs first
            s, loss, grad = run(name, num_tokens)
            seconds[name].append(s)
            results[name] = (loss, grad)
    (fused_loss, fused_grad), (ref_loss, ref_grad) = results["fused"], results["checkpointed"]
    median = {name: float(np.median(v)) for name, v in seconds.items()}
    emit(
        {
            "num_tokens": num_tokens,
            "dim": dim,
            "vocab": VOCAB,
            "repeats": repeats,
            "seconds": seconds,
            "median_seconds": median,
            "speedup": median["checkpointed"] / median["fused"],
            "loss_relative_difference": abs(float(fused_loss - ref_loss)) / abs(float(ref_loss)),
            "grad_relative_difference": float((fused_grad - ref_grad).abs().max() / ref_grad.abs().max()),
        }
    )


# -- parent -------------------------------------------------------------------------------------------


def loader(folders: dict[str, Path], batch_size: int = 8, seconds: float = 3.0, repeats: int = 3) -> dict:
    """Each dataset's median run by loader tokens/s, of ``repeats`` runs interleaved across the datasets."""
    runs: dict[str, list[dict]] = {label: [] for label in folders}
    for _ in range(repeats):
        for label, folder in folders.items():
            runs[label].append(run_child([SCRIPT, "loader", str(folder), str(batch_size), str(seconds)]))
    return {label: median_run(r, "loader_tokens_per_s") for label, r in runs.items()}


def train_step(folder: Path, batch_size: int = 1, steps: int = 4, docs_per_padded_batch: int = 8) -> dict:
    return run_child([SCRIPT, "train", str(folder), str(batch_size), str(steps), str(docs_per_padded_batch)])


def loss_memory(
    naive_tokens: tuple[int, ...] = (1024, 2048), target: int = 8192, measure_naive_target: bool = False
) -> dict:
    """Chunked (the fused path a plain head takes) versus naive peak at ``target`` tokens, and the
    checkpointed reference there. Full logits at 8,192 x 151,936 need ~15 GB (logits, log-softmax and
    gradient); on a shared 23 GB box the naive peak is measured at smaller T and extrapolated linearly
    (it is linear in T) unless ``measure_naive_target``."""
    chunked = {t: run_child([SCRIPT, "loss", str(t), "chunked"]) for t in (naive_tokens[-1], target)}
    checkpointed = run_child([SCRIPT, "loss", str(target), "checkpointed"])
    sizes = (*naive_tokens, target) if measure_naive_target else naive_tokens
    naive = {t: run_child([SCRIPT, "loss", str(t), "naive"]) for t in sizes}
    if target in naive:
        naive_target, how = naive[target]["peak_added_mib"], "measured"
    else:
        (t1, t2) = naive_tokens[-2:]
        p1, p2 = naive[t1]["peak_added_mib"], naive[t2]["peak_added_mib"]
        naive_target, how = p2 + (p2 - p1) / (t2 - t1) * (target - t2), "extrapolated"
    return {
        "target_tokens": target,
        "vocab": VOCAB,
        "chunked": {str(k): v for k, v in chunked.items()},
        "naive": {str(k): v for k, v in naive.items()},
        "checkpointed": {str(target): checkpointed},
        "naive_at_target_mib": naive_target,
        "naive_at_target": how,
        "ratio_at_target": chunked[target]["peak_added_mib"] / naive_target,
        "ratio_measured": {
            str(t): chunked[t]["peak_added_mib"] / naive[t]["peak_added_mib"]
            for t in naive_tokens
            if t in chunked
        },
    }


def loss_speed(num_tokens: int = 2048, dim: int = 896, repeats: int = 3) -> dict:
    """Fused versus checkpointed loss, forward + backward, at Qwen2.5-0.5B's width and vocabulary."""
    return run_child([SCRIPT, "loss_speed", str(num_tokens), str(dim), str(repeats)], timeout=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("child", choices=["loader", "train", "loss", "loss_speed"])
    parser.add_argument("args", nargs="*")
    a = parser.parse_args()
    if a.child == "loader":
        child_loader(a.args[0], int(a.args[1]), float(a.args[2]))
    elif a.child == "train":
        child_train(a.args[0], *map(int, a.args[1:]))
    elif a.child == "loss":
        child_loss(int(a.args[0]), a.args[1])
    else:
        child_loss_speed(*map(int, a.args))


if __name__ == "__main__":
    main()
