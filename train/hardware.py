"""Where and in what precision a run computes: device choice (CUDA, Apple MPS, CPU) and ``--dtype``.

``--device auto`` takes CUDA, else MPS, else the CPU, and refuses a machine whose GPU this torch cannot
use (a CPU-only build on an NVIDIA machine, an Apple silicon Mac without MPS) instead of training it on
the CPU unnoticed. ``--dtype auto`` is bf16 on a CUDA GPU that has it and fp32 elsewhere; fp16 is refused,
since it needs loss scaling that the loop does not do.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import torch

from shared.errors import UserError


class DeviceError(UserError):
    """The device or precision asked for cannot run on this machine or this torch."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu (see :func:`auto_device`); a named device must be usable."""
    if str(device) == "auto":
        return auto_device()[0]
    try:
        device = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device!r} is unknown; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = unusable_gpu() or "this machine has no CUDA GPU that torch can see"
        raise DeviceError(
            f"--device {device} was asked for, but CUDA is not available: {why}. Or use --device cpu."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        why = (
            "MPS needs macOS 12.3 or newer on Apple silicon"
            if torch.backends.mps.is_built()
            else f"torch {torch.__version__} was built without MPS (install the macOS wheel: `pip install torch`)"
        )
        raise DeviceError(
            f"--device mps was asked for, but MPS is not available: {why}. Or use --device cpu."
        )
    return device


def auto_device() -> tuple[torch.device, str]:
    """What ``--device auto`` picks, and why: cuda, else mps, else cpu. A machine with a GPU that torch
    cannot use is refused rather than trained on the CPU without anyone noticing."""
    if torch.cuda.is_available():
        return torch.device("cuda"), f"auto: CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "auto: Apple MPS"
    problem = unusable_gpu()
    if problem is not None:
        raise DeviceError(
            f"--device auto found a GPU that torch cannot use: {problem}. Training would silently run"
            " on the CPU instead; fix the install, or pass --device cpu to train on the CPU on purpose."
        )
    return torch.device("cpu"), "auto: no CUDA or MPS device"


def unusable_gpu() -> str | None:
    """Why a GPU this machine has cannot be used by this torch, or None when there is no such GPU."""
    nvidia = next((p for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl") if Path(p).exists()), None)
    if nvidia is None and shutil.which("nvidia-smi"):
        nvidia = "nvidia-smi"
    if nvidia is not None and not torch.cuda.is_available():
        if torch.version.cuda is None:
            return (
                f"it has an NVIDIA GPU ({nvidia}) but torch {torch.__version__} is a CPU-only build; install"
                " a CUDA build (`pip install torch --index-url https://download.pytorch.org/whl/cuXYZ`, the"
                " README's table)"
            )
        return (
            f"it has an NVIDIA GPU ({nvidia}) and torch {torch.__version__} is built for CUDA"
            f" {torch.version.cuda}, but torch.cuda.is_available() is False (a driver older than the build,"
            " or CUDA_VISIBLE_DEVICES hides every GPU; `nvidia-smi` shows the driver)"
        )
    if (
        platform.system() == "Darwin"
        and platform.machine() == "arm64"
        and not torch.backends.mps.is_available()
    ):
        if not torch.backends.mps.is_built():
            return f"it is an Apple silicon Mac but torch {torch.__version__} was built without MPS"
        return "it is an Apple silicon Mac but MPS is not available (it needs macOS 12.3 or newer)"
    return None


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""``--dtype`` choices the loop runs (``auto`` resolves to one of them; fp16 is refused)."""


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in for ``--dtype precision`` on ``device``: ``auto`` is bf16 on a CUDA GPU
    that supports it, else fp32 (CPU results stay exact references; MPS stays on the tested path)."""
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if precision == "fp16":
        raise DeviceError(
            "--dtype fp16 is not supported: it needs loss scaling (a GradScaler) that this loop does not do;"
            " use --dtype bf16 or --dtype fp32."
        )
    if precision not in PRECISIONS:
        raise DeviceError(f"--dtype {precision!r} is unknown; choose auto, bf16 or fp32.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support (it needs NVIDIA Ampere"
            " or newer); use --dtype fp32."
        )
    return PRECISIONS[precision]


VARLEN_TORCH = (2, 9)
"""The torch release that ships ``torch.nn.attention.varlen.varlen_attn`` (pyproject's floor)."""


def torch_release(version: str = torch.__version__) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype loss sums and token counts accumulate in: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64
