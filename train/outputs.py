"""The files a run leaves in its folder besides checkpoints: metrics.jsonl, loss.png, the exported weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

import psutil
import torch

from shared.errors import UserError
from shared.fileio import atomic_write_text, open_to_umask
from train.checkpoint import unwrap
from train.tokenizer_files import copy_tokenizer

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def make_out_folder(out: Path) -> None:
    """Create ``out`` before any work, so that an --out that cannot hold the run fails at once."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out `{out}` is a file; pass a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--out `{out}` cannot be created ({e.strerror or e}); pass a folder in a writable place."
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out `{out}` is not writable; pass a folder in a writable place.")


def open_metrics(path: Path, *, keep_through: int) -> TextIO:
    """Open metrics.jsonl for appending, first dropping records after step ``keep_through`` (those of
    a run killed after its last checkpoint: the resumed run writes them again)."""
    if path.exists():
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line and json.loads(line)["step"] <= keep_through
        ]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return open(path, "a", encoding="utf-8")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def export_weights(
    model: torch.nn.Module, out: Path, state_dict: dict | None = None, tokenizer: Path | None = None
) -> Path:
    """The trained adapter via peft ``save_pretrained`` (or the whole model) under ``out``, with the
    tokenizer files of folder ``tokenizer``; ``state_dict`` holds the unsharded weights of an FSDP model."""
    model = unwrap(model)
    target = out / ("adapter" if hasattr(model, "peft_config") else "model")
    model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)
    copy_tokenizer(tokenizer, target)
    open_to_umask(target)  # the folder a run is for is shared; safetensors writes it 0600
    return target


def record_kind(entry: dict) -> str:
    """``train``, ``eval``, ``resume`` or ``samples``: the record's ``kind`` field, or for files written before it
    existed, what its fields say."""
    if "kind" in entry:
        return entry["kind"]
    if "eval_loss" in entry:
        return "eval"
    if "resumed_from" in entry:
        return "resume"
    return "train" if "loss" in entry else "other"


def loss_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "eval NAME": [...]}`` from metrics.jsonl records, one eval curve per
    eval set (``eval_set``); eval records written before sets had names make the curve ``eval``."""
    curves: dict[str, list[tuple[int, float]]] = {"train": []}
    for r in records:
        kind = record_kind(r)
        if kind == "train":
            curves["train"].append((r["step"], r["loss"]))
        elif kind == "eval" and "eval_loss" in r:
            label = f"eval {r['eval_set']}" if "eval_set" in r else "eval"
            curves.setdefault(label, []).append((r["step"], r["eval_loss"]))
    return curves


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Train and eval loss against the step, the learning rate on a second axis; written atomically,
    so a reader (or a run killed while drawing) never sees half a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    curves = loss_curves(records)
    lr_pts = [(r["step"], r["lr"]) for r in records if record_kind(r) == "train" and "lr" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), "-" if label == "train" else "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean CE per target token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr_pts:
        lr_ax = ax.twinx()
        (line,) = lr_ax.plot(*zip(*lr_pts, strict=True), ":", color="tab:gray", label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        handles, labels = [*handles, line], [*labels, "lr"]
    if handles:
        ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
