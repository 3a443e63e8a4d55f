"""What ran: the facts a run states in its first log lines and keeps in ``run.json``.

Device, dtypes, the attention backend and why it was chosen, the model and its LoRA targets, the
trainable parameters, the plan, and the basis of the MFU figure. :func:`describe_run` gathers them from
the objects `train.loop.setup` built (not from the options: ``auto`` is resolved by then);
:func:`header_lines` and :func:`warning_lines` say them, and :func:`write_run_json` keeps them, one
entry per start of the process (a resumed run may run on another device or kernel).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.fileio import atomic_write_text
from train.attention import AttnChoice
from train.model import autocast_of, causal_lm
from train.plan import RunPlan, describe
from train.throughput import device_label, format_duration, mfu, peak_flops

RUN_JSON = "run.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunInfo:
    start_step: int
    """0, or the checkpoint's step on resume."""
    device: str
    """``cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)``, ``cpu (2 threads)``."""
    device_type: str
    requested_device: str
    """The ``--device`` value (``auto`` picks cuda, else mps, else cpu: `train.hardware.auto_device`)."""
    device_reason: str
    """Why this device: ``asked for``, or what ``auto`` found."""
    world_size: int
    torch_version: str
    weights_dtype: str
    """The frozen base's dtype under LoRA, every weight's otherwise."""
    trainable_dtype: str
    compute_dtype: str
    """The matmuls' dtype: the autocast dtype of ``--dtype`` (bf16 on a GPU by default), else the weights'."""
    grad_checkpointing: bool
    compiled: bool = False
    """Each decoder layer compiled (``--compile``: torch.compile, inductor, dynamic shapes)."""
    attn: AttnChoice
    model: str
    model_type: str
    num_layers: int
    lora_targets: tuple[str, ...] | None
    """The adapted module names, or None for full fine-tuning."""
    lora_r: int | None
    lora_alpha: int | None
    num_params: int
    num_trainable: int
    tokens_per_step: int
    num_steps: int
    num_warmup_steps: int
    epochs: float | None
    flops_per_token: float
    """`train.throughput.train_flops_per_token` of this model."""
    peak_flops: float | None
    """The device's dense bf16 peak (FLOP/s), None on CPU or an unknown GPU: then no MFU."""
    working_dir: str = ""
    """The folder the run was started in: what its options' relative paths were given from."""

    @property
    def trainable_share(self) -> float:
        return self.num_trainable / max(self.num_params, 1)

    def mfu(self, tok_per_s: float) -> float | None:
        """The MFU of ``tok_per_s`` (all ranks), or None without a known peak (CPU, unknown GPU)."""
        return mfu(tok_per_s, self.flops_per_token, self.peak_flops, self.world_size)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "trainable_share": self.trainable_share}


def describe_run(
    *,
    cfg_model: str,
    model: nn.Module,
    attn: AttnChoice,
    plan: RunPlan,
    device: torch.device,
    requested_device: str,
    world_size: int,
    start_step: int,
    flops_per_token: float,
    grad_checkpointing: bool = False,
    compiled: bool = False,
    device_reason: str = "asked for",
) -> RunInfo:
    """The facts of a run about to take step ``start_step + 1`` with ``model`` on ``device``."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    lm = causal_lm(model)
    peft_config = getattr(model, "peft_config", {}).get("default")
    autocast = autocast_of(model, device)
    weights_dtype = (frozen or trainable)[0].dtype
    compute = autocast.fast_dtype if isinstance(autocast, torch.autocast) else weights_dtype
    return RunInfo(
        start_step=start_step,
        device=device_label(device),
        device_type=device.type,
        requested_device=requested_device,
        device_reason=device_reason,
        world_size=world_size,
        torch_version=torch.__version__,
        weights_dtype=_dtype(weights_dtype),
        trainable_dtype=_dtype(trainable[0].dtype) if trainable else "-",
        compute_dtype=_dtype(compute),
        grad_checkpointing=grad_checkpointing,
        compiled=compiled,
        attn=attn,
        model=cfg_model,
        model_type=lm.config.model_type,
        num_layers=lm.config.num_hidden_layers,
        lora_targets=tuple(sorted(peft_config.target_modules)) if peft_config else None,
        lora_r=peft_config.r if peft_config else None,
        lora_alpha=peft_config.lora_alpha if peft_config else None,
        num_params=sum(p.numel() for p in params),
        num_trainable=sum(p.numel() for p in trainable),
        tokens_per_step=plan.tokens_per_step,
        num_steps=plan.num_steps,
        num_warmup_steps=plan.num_warmup_steps,
        epochs=plan.epochs,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
        working_dir=str(Path.cwd()),
    )


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def header_lines(info: RunInfo, plan: RunPlan) -> list[str]:
    """The run's first lines: where and how it runs, what it trains, and the plan (`train plan`'s)."""
    ranks = f" x {info.world_size} ranks" if info.world_size > 1 else ""
    if info.lora_targets is None:
        what = "full fine-tuning (every weight)"
    else:
        what = f"LoRA r {info.lora_r}, alpha {info.lora_alpha} on {', '.join(info.lora_targets)}"
    lines = [
        f"{'device':<17}{info.device}{ranks}, --device {info.requested_device} ({info.device_reason})"
        f" | torch {info.torch_version}",
        f"{'dtype':<17}weights {info.weights_dtype}, trainable {info.trainable_dtype},"
        f" compute {info.compute_dtype} | grad checkpointing {'on' if info.grad_checkpointing else 'off'}"
        + (" | compile on (inductor, each decoder layer)" if info.compiled else ""),
        f"{'attention':<17}{info.attn.backend} ({info.attn.reason})",
        f"{'model':<17}{info.model} ({info.model_type}, {info.num_layers} layers) | {what}",
        f"{'trainable':<17}{info.num_trainable:,} of {info.num_params:,} parameters"
        f" ({info.trainable_share:.2%})",
    ]
    if info.device_type == "cuda":
        peak = f"{info.peak_flops / 1e12:,.0f} TFLOP/s dense bf16" if info.peak_flops else "unknown GPU"
        lines.append(
            f"{'mfu basis':<17}{info.flops_per_token / 1e9:,.3g} GFLOP per token; peak {peak}"
            + ("" if info.peak_flops else " (no MFU: add it to train.throughput.PEAK_BF16_TFLOPS)")
        )
    return lines + describe(plan)


def warning_lines(info: RunInfo) -> list[str]:
    """What a person should see before the first step: a GPU run on the per-segment reference."""
    if not info.attn.is_gpu_reference:
        return []
    fix = (
        "install flash-attn (the `gpu` extra) or torch >= 2.9 for torch.nn.attention.varlen"
        if info.attn.requested == "auto"
        else "pass --attn auto (or flash_attn, torch_varlen)"
    )
    return [
        "warning: this GPU run uses the per-segment SDPA reference (--attn sdpa), several times slower"
        f" than the varlen kernels (4-6x on an H200, BENCHMARKS.md); {fix}."
    ]


def step_line(
    *,
    step: int,
    num_steps: int,
    loss: float,
    lr: float,
    num_targets: int,
    tok_per_s: float,
    mfu: float | None,
    mem_bytes: int,
    eta_s: float,
) -> str:
    """``step 25/300 | loss 3.3832 | lr 9.98e-03 | targets 2,040 | tok/s 1,257 | mfu 31.2% | mem 0.48 GiB |
    eta 1m23s``: ``targets``, the step's target tokens (all ranks; fewer than its tokens in a pack of
    conversations, prep/chat_pack.py); ``mfu`` only when known (a GPU in the peak table)."""
    parts = [
        f"step {step:>6,}/{num_steps:,}",
        f"loss {loss:.4f}",
        f"lr {lr:.2e}",
        f"targets {num_targets:,}",
        f"tok/s {tok_per_s:>9,.0f}",
    ]
    if mfu is not None:
        parts.append(f"mfu {mfu:.1%}")
    parts += [f"mem {mem_bytes / 2**30:.2f} GiB", f"eta {format_duration(eta_s)}"]
    return " | ".join(parts)


def write_run_json(out: Path, info: RunInfo, *, resumed: bool) -> Path:
    """``out/run.json``: ``{"starts": [...]}``, one :class:`RunInfo` per start of the run (a fresh run
    starts the list again; a resume appends to it)."""
    path = out / RUN_JSON
    starts: list[dict] = []
    if resumed and path.exists():
        starts = [s for s in json.loads(path.read_text(encoding="utf-8"))["starts"]]
    starts.append(info.to_json())
    atomic_write_text(path, json.dumps({"starts": starts}, indent=2) + "\n")
    return path


def read_run_json(out: Path) -> list[dict]:
    """The starts recorded in ``out/run.json``, oldest first."""
    return json.loads((out / RUN_JSON).read_text(encoding="utf-8"))["starts"]
