"""Training checkpoints: written atomically, verified by sha256 before use, loaded without unpickling.

A checkpoint is a folder ``checkpoints/step-00000100/``::

    adapter/                  LoRA runs: peft ``save_pretrained`` (adapter_model.safetensors + config),
                              so ``PeftModel.from_pretrained(base, adapter/)`` loads it as it is;
                              with the dataset's tokenizer files (`train.tokenizer_files`)
    model.safetensors         full fine-tuning: every weight, unsharded (one copy of tied weights)
    optimizer.pt              AdamW state (tensors and numbers only; read with ``weights_only=True``);
                              keyed by parameter name for full fine-tuning, so that a run saved with
                              FSDP on N ranks resumes on M ranks, with or without FSDP
    rng.safetensors           torch CPU (and CUDA) generator states
    state.json                step, loader position, scheduler, Python/numpy RNG, run options
    checkpoint.json           written last: sha256 and size of every file above

Everything is first written to a hidden temporary folder, each file fsynced, then the folder is renamed
into place and its parent fsynced. A run killed at any moment therefore leaves either no new checkpoint
or a complete one (a leftover ``.tmp`` folder is ignored and removed by the next save). Before a
checkpoint is loaded every file is checked against ``checkpoint.json``; a truncated or altered file
is refused with a message naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from shared.errors import UserError
from shared.fileio import atomic_write_text, fsync_dir, sha256_file
from train.tokenizer_files import copy_tokenizer

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "checkpoint.json"
FORMAT = "train-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, damaged, or does not fit this run."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_peft(model: nn.Module) -> bool:
    return hasattr(unwrap(model), "peft_config")


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIR / f"step-{step:08d}"


def save_checkpoint(
    out: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader_state: dict[str, int],
    extra: dict[str, Any] | None = None,
    full: tuple[dict, dict] | None = None,
    tokenizer: Path | None = None,
) -> Path:
    """Write the checkpoint of ``step`` under ``out/checkpoints``; return its folder.

    ``tokenizer`` is a folder whose tokenizer files are copied into the adapter folder, which then
    loads alone (`train.tokenizer_files`).

    ``full`` is (model, optimizer) state gathered by `train.parallel.full_state` for full fine-tuning
    (required when the model is sharded: this rank alone cannot read the other shards).
    """
    final = step_dir(out, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(".step-*.tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        if full is not None:
            safetensors.torch.save_file(full[0], tmp / "model.safetensors")
            torch.save(full[1], tmp / "optimizer.pt")
        else:
            _write_weights(tmp, model, tokenizer)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        safetensors.torch.save_file(_torch_rng_state(), tmp / "rng.safetensors")
        state = {
            "step": step,
            "loader": loader_state,
            "scheduler": scheduler.state_dict(),
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            **(extra or {}),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(path)
            files[path.relative_to(tmp).as_posix()] = {
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        for folder in {p.parent for p in tmp.rglob("*")}:
            fsync_dir(folder)
        atomic_write_text(
            tmp / MANIFEST,
            json.dumps({"format": FORMAT, "version": VERSION, "step": step, "files": files}, indent=2) + "\n",
        )
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, quota, folder removed: the user's to fix, then resume
            done = [p.name for p in list_checkpoints(out)]
            since = f"from `{done[-1]}`" if done else "from the start (no checkpoint was saved yet)"
            raise CheckpointError(
                f"cannot write checkpoint `{final}` ({e.strerror or e}); nothing of it was kept. Free space"
                f" or fix the folder, then run again with --resume: it continues {since}."
            ) from None
        raise
    return final


def _write_weights(folder: Path, model: nn.Module, tokenizer: Path | None) -> None:
    model = unwrap(model)
    if is_peft(model):
        model.save_pretrained(folder / "adapter", safe_serialization=True)
        copy_tokenizer(tokenizer, folder / "adapter")
    else:
        # save_model (not save_file) handles tied weights such as a shared embedding/output head.
        safetensors.torch.save_model(model, str(folder / "model.safetensors"))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def list_checkpoints(out: Path) -> list[Path]:
    """Complete-looking checkpoint folders (renamed into place), oldest first."""
    parent = Path(out) / CHECKPOINTS_DIR
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(out: Path, keep: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints under ``out`` (never ``protect``, the checkpoint
    a resumed run started from); return the deleted folders.

    Each folder is first renamed to a hidden ``.step-*.tmp-*`` name, which `list_checkpoints` never
    returns and the next save removes, so a run killed while deleting leaves only whole checkpoints.
    """
    found = list_checkpoints(out)
    doomed = [p for p in found[: max(0, len(found) - keep)] if protect is None or p.name != protect.name]
    for path in doomed:
        hidden = path.parent / f".{path.name}.tmp-del-{os.getpid()}"
        os.replace(path, hidden)
        fsync_dir(path.parent)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def latest_checkpoint(out: Path) -> Path:
    found = list_checkpoints(out)
    if not found:
        raise CheckpointError(
            f"--resume: `{out}` has no checkpoint under {CHECKPOINTS_DIR}/ (none was saved before the run"
            " stopped). Start without --resume, or pass the --out of the run you mean."
        )
    return found[-1]


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest, after checking every file's size and sha256 against it."""
    path = Path(path)
    manifest_path = path / MANIFEST
    earlier = [p.name for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    fix = (
        f"Delete `{path}` to resume from the previous checkpoint `{earlier[-1]}`."
        if earlier
        else f"Delete `{path}` and start the run again."
    )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        ok = manifest.get("format") == FORMAT and isinstance(files, dict)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint `{path}` has no {MANIFEST}: it is incomplete. {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint `{path}`: {MANIFEST} is damaged ({e}). {fix}") from None
    if not ok:
        raise CheckpointError(f"checkpoint `{path}`: {MANIFEST} is not a {FORMAT} manifest. {fix}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint `{path}` has version {manifest.get('version')!r}; this trainer reads {VERSION}. {fix}"
        )
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint `{path}`: `{name}` is missing. {fix}")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint `{path}`: `{name}` has {size:,} bytes, the manifest says {info['bytes']:,}"
                f" (truncated or overwritten). {fix}"
            )
        digest = sha256_file(file)
        if digest != info["sha256"]:
            raise CheckpointError(
                f"checkpoint `{path}`: `{name}` is corrupted (sha256 {digest[:12]}..., the manifest says"
                f" {info['sha256'][:12]}...). {fix}"
            )
    return manifest


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The checkpoint's state.json, after every file of the checkpoint has been verified."""
    verify_checkpoint(path)
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Verify ``path``, restore model/adapter, optimizer, scheduler and RNG in place; return state.json
    (its ``loader`` entry is for the caller's loader)."""
    state = read_checkpoint_state(path)
    restore_checkpoint(path, state, model=model, optimizer=optimizer, scheduler=scheduler)
    return state


def restore_checkpoint(
    path: Path,
    state: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore model/adapter, optimizer, scheduler and RNG in place from ``path``, whose ``state`` the
    caller read with `read_checkpoint_state` (which verified every file)."""
    path = Path(path)
    model = unwrap(model)
    device = next(model.parameters()).device
    if is_peft(model):
        _load_adapter(path, model)
        optimizer.load_state_dict(_read_optimizer(path, device))
    else:
        _load_full(path, model, optimizer, _read_optimizer(path, torch.device("cpu")), device)
    scheduler.load_state_dict(state["scheduler"])
    _restore_torch_rng(safetensors.torch.load_file(path / "rng.safetensors"))
    random.setstate(_tuples(state["python_rng"]))
    np.random.set_state(_numpy_from_json(state["numpy_rng"]))


def _read_optimizer(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        # weights_only: tensors and plain containers only; never run code from a file we did not check.
        return torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint `{path}`: optimizer.pt holds objects other than tensors and numbers; refusing to"
            f" unpickle it ({str(e).splitlines()[0]}). Was it written by this trainer?"
        ) from None


def _load_full(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict, device
) -> None:
    """Every weight and the optimizer, into a plain or an FSDP-sharded model."""
    from torch.distributed.fsdp import FSDPModule

    from train.parallel import set_full_state

    if not (path / "model.safetensors").is_file():
        raise CheckpointError(
            f"checkpoint `{path}` holds a LoRA adapter; this run trains every weight (--no-lora). Resume"
            " with LoRA, or start a new --out."
        )
    sharded = any(isinstance(m, FSDPModule) for m in model.modules())
    by_name = all(isinstance(k, str) for k in optimizer_state.get("state", {}))
    if by_name:  # written through train.parallel.full_state: any number of ranks, FSDP or not
        weights = safetensors.torch.load_file(path / "model.safetensors")
        try:
            set_full_state(model, optimizer, weights, optimizer_state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint `{path}` does not fit this model ({str(e).splitlines()[0][:300]}); resume"
                " with the same --model."
            ) from None
        return
    if sharded:
        raise CheckpointError(
            f"checkpoint `{path}` keeps its optimizer state by position (an older format); resume it"
            " without --fsdp, or start a new --out."
        )
    missing, unexpected = safetensors.torch.load_model(
        model, str(path / "model.safetensors"), strict=False, device=str(device)
    )
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint `{path}` does not fit this model (missing {missing[:3]}, unexpected"
            f" {unexpected[:3]}); resume with the same --model."
        )
    optimizer.load_state_dict(optimizer_state)


def _load_adapter(path: Path, model: nn.Module) -> None:
    file = path / "adapter" / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint `{path}` holds full model weights; this run trains a LoRA adapter. Resume with"
            " --no-lora, or start a new --out."
        )
    load_adapter_weights(
        file,
        model,
        what=f"checkpoint `{path}`",
        fix="resume with the same --model, --lora-r and --lora-alpha",
    )


def load_adapter_weights(file: Path, model: nn.Module, *, what: str, fix: str) -> None:
    """Load a peft ``adapter_model.safetensors`` into the LoRA ``model`` in place; a CheckpointError
    that names ``what`` and says ``fix`` when its tensors do not fit."""
    from peft import set_peft_model_state_dict

    device = next(model.parameters()).device
    weights = safetensors.torch.load_file(file, device=str(device))
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # another LoRA rank or target modules: the tensors' shapes differ
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise CheckpointError(
            f"{what}: its adapter does not fit this model ({mismatch[:300]}); {fix}."
        ) from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{what}: adapter weights {unexpected[:3]} do not fit this model; {fix}.")


def _torch_rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _restore_torch_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _python_rng_state() -> list:
    return list(random.getstate())


def _tuples(value: Any) -> Any:
    """JSON turned Python's RNG state tuples into lists; setstate wants tuples back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _numpy_rng_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_from_json(state: list) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached


def init_adapter(source: Path, model: nn.Module, *, lora_r: int, lora_alpha: int) -> Path:
    """Load the LoRA weights of ``source`` into ``model`` (`--init-adapter`); return the adapter folder.

    ``source`` is an adapter folder (peft ``save_pretrained``: a run's ``adapter/``), a run folder
    (its ``adapter/``), or a checkpoint folder (verified first). Its rank and alpha must be this run's:
    the adapter is continued, not reshaped.
    """
    source = Path(source)
    if (source / MANIFEST).is_file():
        verify_checkpoint(source)
    folder = next(
        (f for f in (source, source / "adapter") if (f / "adapter_model.safetensors").is_file()), None
    )
    if folder is None:
        raise CheckpointError(
            f"--init-adapter `{source}` holds no LoRA adapter (no adapter_model.safetensors there or in"
            " its adapter/); pass a run's adapter/ folder, the run folder, or one of its checkpoints."
        )
    try:
        saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--init-adapter `{folder}`: cannot read adapter_config.json ({e}).") from None
    if (saved.get("r"), saved.get("lora_alpha")) != (lora_r, lora_alpha):
        raise CheckpointError(
            f"--init-adapter `{folder}` has LoRA r {saved.get('r')} and alpha {saved.get('lora_alpha')}, this"
            f" run --lora-r {lora_r} --lora-alpha {lora_alpha}; give --lora-r {saved.get('r')}"
            f" --lora-alpha {saved.get('lora_alpha')}."
        )
    load_adapter_weights(
        folder / "adapter_model.safetensors",
        unwrap(model),
        what=f"--init-adapter `{folder}`",
        fix="give the --model it was trained on",
    )
    return folder
