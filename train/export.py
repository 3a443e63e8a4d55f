"""`train export`: a run's weights as a folder that plain Hugging Face tools load, with its tokenizer.

    train export runs/r1 --merge --out r1-merged/    # AutoModelForCausalLM.from_pretrained("r1-merged/")
    train export runs/r1 --out r1-adapter/           # PeftModel.from_pretrained(base, "r1-adapter/")

The weights come from a checkpoint (``--checkpoint N``, default the newest: a run always saves its last
step), verified against its checksums first; its ``state.json`` says which base model and dataset the
run used. What is written:

- ``--merge`` (LoRA runs): the base model with the adapter merged in (peft ``merge_and_unload``), saved
  with ``save_pretrained`` in the base's stored dtype. Its config names the standard attention of
  transformers (the base is loaded plainly), never this project's varlen functions, so any transformers
  install loads and generates with it.
- without ``--merge``: the adapter (``adapter_config.json``, ``adapter_model.safetensors``) whose
  ``base_model_name_or_path`` is the base folder's absolute path, so it loads from any working directory.
- a full fine-tuning run (``--no-lora``): the whole model, saved with ``save_pretrained``.

Every form carries the tokenizer files (chat template included): the checkpoint's own copy, else the
dataset's tokenizer if unchanged (`train.tokenizer_files`), else the base folder's; ``--tokenizer``
overrides. A model whose generation config names no EOS gets the dataset's. The folder is written
under a temporary name beside ``--out`` and renamed into place, so a failed export leaves nothing
half-written; a non-empty ``--out`` is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import UserError
from shared.fileio import fsync_dir, open_to_umask
from shared.manifest import Manifest
from train.checkpoint import list_checkpoints, read_checkpoint_state, step_dir
from train.model import TINY_QWEN2, load_base
from train.runpaths import resolve_config
from train.tokenizer_files import TOKENIZER_JSON, copy_tokenizer, dataset_tokenizer, tokenizer_folder

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(UserError):
    """The run cannot be exported as asked."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportConfig:
    run: Path
    """The run folder (`train run --out`)."""
    out: Path
    """The folder to write."""
    checkpoint: int | None = None
    """Step of the checkpoint to export; default the newest."""
    merge: bool = False
    """Merge a LoRA adapter into the base weights (a complete model folder); else write the adapter."""
    overwrite: bool = False
    """Replace a non-empty ``out``."""
    base: str | None = None
    """The base model folder, when the one the run names is not found from here (a relative path)."""
    tokenizer: Path | None = None
    """The tokenizer folder (or its tokenizer.json) to ship, instead of the one found."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    out: Path
    kind: str
    """``merged model``, ``adapter`` or ``model`` (full fine-tuning)."""
    checkpoint: Path
    base: str
    tokenizer: Path
    files: list[str]


def export_run(cfg: ExportConfig) -> ExportResult:
    """Write ``cfg.run``'s weights to ``cfg.out`` as the module docstring says; return what was written."""
    check_out(cfg.out, cfg.overwrite, protected=[cfg.run])
    checkpoint = pick_checkpoint(cfg.run, cfg.checkpoint)
    # verifies every file of the checkpoint; the run's paths made absolute, to hold from any folder
    run_cfg = resolve_config(read_checkpoint_state(checkpoint)["config"], cfg.run)
    lora = (checkpoint / "adapter").is_dir()
    base = resolve_base(cfg.base or run_cfg["model"], checkpoint, given=cfg.base is not None)
    if base != TINY_QWEN2:
        check_out(cfg.out, cfg.overwrite, protected=[Path(base)])
    tokenizer = find_tokenizer(cfg.tokenizer, checkpoint, run_cfg["data"], base)
    if lora and not cfg.merge and base == TINY_QWEN2:
        raise ExportError(
            f"run `{cfg.run}` trained `{TINY_QWEN2}`, a built-in random model with no folder that an adapter"
            " could name as its base; export it with --merge (a complete model folder)."
        )
    tmp = cfg.out.parent / f".{cfg.out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if lora and not cfg.merge:
            write_adapter(checkpoint / "adapter", base, tmp)
        else:
            model = load_base(base, vocab_size=_vocab_size(base, run_cfg["data"]), seed=run_cfg["seed"])
            model = _with_run_weights(model, checkpoint, lora)
            _default_eos(model, run_cfg["data"])
            model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(tokenizer, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        publish(tmp, cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kind = ("merged model" if cfg.merge else "adapter") if lora else "model"
    return ExportResult(cfg.out, kind, checkpoint, base, tokenizer, files)


def check_out(out: Path, overwrite: bool, protected: list[Path]) -> None:
    """Refuse an ``out`` that is a file, holds files (without ``overwrite``), or would replace a folder in
    ``protected`` (the run, the base model) or one holding it."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out `{out}` is a file; pass a folder (it is created).")
    target = out.resolve()
    for folder in protected:
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            raise ExportError(
                f"--out `{out}` would replace `{folder}`, which the export reads; pass another --out."
            )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out `{out}` is not empty; pass --overwrite to replace it, or another --out.")


def pick_checkpoint(run: Path, step: int | None) -> Path:
    """The checkpoint folder of ``step`` (default the newest) in run folder ``run``."""
    found = list_checkpoints(run)
    if not found:
        raise ExportError(
            f"`{run}` has no checkpoint under checkpoints/: it is not a `train run --out` folder, or the run"
            " stopped before its first save. Pass the --out of a run."
        )
    if step is None:
        return found[-1]
    path = step_dir(run, step)
    if path not in found:
        steps = ", ".join(str(int(p.name.split("-")[1])) for p in found)
        raise ExportError(f"`{run}` has no checkpoint of step {step}; it has steps {steps} (--checkpoint).")
    return path


def resolve_base(spec: str, checkpoint: Path, *, given: bool) -> str:
    """The base model as an absolute folder path (or `tiny-qwen2`): ``spec`` (--base, or the run's
    --model, made absolute by `train.runpaths`), else the absolute ``base_model_name_or_path`` the
    adapter names."""
    if spec == TINY_QWEN2:
        return spec
    if (Path(spec) / "config.json").is_file():
        return str(Path(spec).resolve())
    if not given:
        named = _adapter_base(checkpoint)
        if named and (Path(named) / "config.json").is_file():
            return str(Path(named).resolve())
    if given:
        raise ExportError(
            f"--base `{spec}` is not a model folder (no config.json there); give --base PATH, the model"
            " folder the run trained."
        )
    raise ExportError(
        f"the run's --model `{spec}` is not a model folder (no config.json there): moved or deleted since"
        " the run. Pass it where it is now: --base PATH (the model folder the run trained)."
    )


def _adapter_base(checkpoint: Path) -> str | None:
    config = checkpoint / "adapter" / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def find_tokenizer(override: Path | None, checkpoint: Path, data: str, base: str) -> Path:
    """The folder whose tokenizer files ship with the export (the module docstring's order)."""
    if override is not None:
        folder = tokenizer_folder(override)
        if folder is None:
            raise ExportError(f"--tokenizer `{override}` holds no {TOKENIZER_JSON}; pass its folder or file.")
        return folder
    candidates = [
        tokenizer_folder(checkpoint / "adapter"),
        dataset_tokenizer(data),
        None if base == TINY_QWEN2 else tokenizer_folder(base),
    ]
    found = next((c for c in candidates if c is not None), None)
    if found is None:
        raise ExportError(
            f"no tokenizer found for checkpoint `{checkpoint}`: it carries none, the tokenizer named by the"
            f" manifest of `{data}` is not there (or changed since packing), and the base has none. Pass"
            " --tokenizer PATH (the tokenizer the data was packed with)."
        )
    return found


def _vocab_size(base: str, data: str) -> int | None:
    """`tiny-qwen2`'s vocabulary is the dataset's tokenizer's; a folder knows its own."""
    if base != TINY_QWEN2:
        return None
    try:
        return Manifest.load(Path(data)).tokenizer.vocab_size
    except UserError as e:
        raise ExportError(
            f"the run trained `{TINY_QWEN2}`, whose vocabulary comes from its dataset `{data}`, which cannot"
            f" be read ({e}); put the dataset back where the run read it."
        ) from None


@torch.no_grad()
def _with_run_weights(model: torch.nn.Module, checkpoint: Path, lora: bool) -> torch.nn.Module:
    """The base ``model`` with the checkpoint's weights: the adapter merged in, or every weight loaded."""
    if lora:
        from peft import PeftModel

        with warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 property that warns of its own deprecation: not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, checkpoint / "adapter").merge_and_unload()
    import safetensors.torch

    missing, unexpected = safetensors.torch.load_model(
        model, str(checkpoint / "model.safetensors"), strict=False
    )
    if missing or unexpected:
        raise ExportError(
            f"checkpoint `{checkpoint}` does not fit the base model (missing {missing[:3]}, unexpected"
            f" {unexpected[:3]}); pass --base with the model the run trained."
        )
    return model


def _default_eos(model: torch.nn.Module, data: str) -> None:
    """A model with no EOS in its generation config stops at the dataset's EOS (what it was trained to end
    documents with), when the dataset is readable from here."""
    generation = getattr(model, "generation_config", None)
    if generation is None or generation.eos_token_id is not None:
        return
    try:
        eos_id = Manifest.load(Path(data)).tokenizer.eos_id
    except UserError:
        return
    generation.eos_token_id = eos_id
    if generation.pad_token_id is None:
        generation.pad_token_id = eos_id


def write_adapter(adapter: Path, base: str, dest: Path) -> None:
    """The adapter's files in ``dest``, its config naming ``base`` (absolute) as the base model."""
    for name in ADAPTER_FILES:
        shutil.copyfile(adapter / name, dest / name)
    config = json.loads((dest / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    (dest / "adapter_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing what is there, files and folders fsynced,
    every file with the mode the umask gives (not safetensors' 0600)."""
    open_to_umask(tmp)
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
