"""`train eval`: a base model, its adapters and a run's checkpoints, scored on named packed datasets.

The models are one base (``--model``, or the model of the run the adapters come from) and what is
trained on it: peft adapter folders, checkpoint folders (an adapter, or full weights) and every
checkpoint of a run. The base is loaded once; each adapter is put on it, evaluated and taken off
again (peft ``unload``), so the base row and every adapter row see the same base weights. Each model
is scored on every eval set by `train.eval` (packed rows, or whole documents in rolling windows), and
the figures land in an :class:`EvalReport` that the CLI prints as a table and writes as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.fileio import atomic_write_text
from shared.manifest import Manifest
from shared.reader import PackedDataset, Split
from train.checkpoint import CHECKPOINTS_DIR, MANIFEST, list_checkpoints, verify_checkpoint
from train.config import named_paths
from train.eval import (
    Document,
    EvalError,
    EvalFigures,
    FirstRows,
    check_caps,
    evaluate_documents,
    evaluate_split,
    find_tokenizer,
    read_documents,
    rows_within,
    token_byte_lengths,
)
from train.model import TINY_QWEN2, default_dtype, input_embeddings, load_model, resolve_device
from train.runpaths import absolute, resolve_config, shown

BASE = "base"


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    data: tuple[tuple[str, Path], ...] = ()
    """Eval sets: (name, packed dataset folder); each is read from its `val` split if it has one, else `train`.
    None given: the eval sets of the run the adapters and checkpoints come from (`run_eval_sets`)."""
    model: str | None = None
    """Base model (a Hugging Face folder or `tiny-qwen2`); default: the model of the runs/checkpoints given."""
    model_name: str | None = None
    """The name of ``model``'s row (`--model NAME=PATH`); default `base` when adapters or checkpoints
    are put on it, else the folder's name (`label_of`)."""
    adapters: tuple[Path, ...] = ()
    """peft adapter folders (a run's `adapter/`) or checkpoint folders (`checkpoints/step-N`)."""
    runs: tuple[Path, ...] = ()
    """Run folders: every checkpoint of each is evaluated."""
    base: bool = True
    """Evaluate the base model too (the first row)."""
    split: str | None = None
    """Split of every eval set; default `val` where there is one, else `train`."""
    max_rows: int | None = None
    max_tokens: int | None = None
    batch_size: int = 8
    """Packed rows per forward (document-level: batch_size * seq_len tokens of windows)."""
    doc_level: bool = False
    window: int | None = None
    """Document-level window in tokens; default the dataset's seq_len."""
    stride: int | None = None
    """Document-level stride; default half the window."""
    tokenizer: Path | None = None
    """tokenizer.json for bits per byte, if the manifest's path does not lead to it."""
    device: str = "auto"
    attn: str = "auto"
    seed: int | None = None
    """Weights of a `tiny-qwen2` base; default the run's seed, else 0."""

    def __post_init__(self) -> None:
        names = [name for name, _ in self.data]
        if len(set(names)) != len(names):
            raise EvalError(
                f"eval set names must differ; got {', '.join(names)}. Name each: --data NAME=PATH."
            )
        check_caps(self.max_rows, self.max_tokens)
        if self.batch_size < 1:
            raise EvalError(f"--batch-size {self.batch_size} must be at least 1.")
        if not self.doc_level and (self.window is not None or self.stride is not None):
            raise EvalError("--window and --stride apply to --doc-level only; add --doc-level, or drop them.")
        if self.model is None and not self.adapters and not self.runs:
            raise EvalError("nothing to evaluate: give --model, --adapter or --run.")


@dataclass(slots=True)
class EvalSet:
    name: str
    path: Path
    manifest: Manifest
    split: Split
    byte_lengths: np.ndarray | None
    tokenizer_file: Path | None
    rows: FirstRows
    """The rows evaluated (packed), or the rows whose documents are (document-level)."""
    documents: list[Document] = field(default_factory=list)
    document_rows: int = 0
    """Rows the documents' fragments lie in (document-level)."""
    window: int = 0
    stride: int = 0


@dataclass(frozen=True, slots=True)
class ModelRow:
    """One row of the table: the base, or the base with an adapter or full weights put on it."""

    name: str
    is_base: bool = False
    """The model every other row is put on (and compared with): `--model`, or the runs' model."""
    adapter: Path | None = None
    weights: Path | None = None
    """A full fine-tuning checkpoint's model.safetensors."""
    step: int | None = None
    config: dict[str, Any] | None = None
    """The options of the run the weights come from (a checkpoint's state.json), if known."""


@dataclass(slots=True)
class EvalReport:
    cfg: EvalConfig
    base_model: str
    sets: list[EvalSet]
    rows: list[ModelRow]
    results: dict[str, dict[str, EvalFigures]] = field(default_factory=dict)
    """Row name -> eval set name -> figures."""
    notes: list[str] = field(default_factory=list)

    @property
    def base_row(self) -> ModelRow | None:
        """The row the others are compared with; None with --no-base."""
        return next((row for row in self.rows if row.is_base), None)

    def to_json(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "mode": "document" if cfg.doc_level else "packed",
            "base_model": self.base_model,
            "sets": [
                {
                    "name": s.name,
                    "path": str(s.path),
                    "split": s.split.name,
                    "rows": s.rows.num_rows,
                    "of_rows": s.split.num_rows,
                    "documents": len(s.documents) if cfg.doc_level else None,
                    "window": s.window if cfg.doc_level else None,
                    "stride": s.stride if cfg.doc_level else None,
                    "tokenizer": str(s.tokenizer_file) if s.tokenizer_file else None,
                }
                for s in self.sets
            ],
            "models": [
                {
                    "name": row.name,
                    "base": row.is_base,
                    "adapter": str(row.adapter) if row.adapter else None,
                    "weights": str(row.weights) if row.weights else None,
                    "step": row.step,
                    "results": {name: f.to_json() for name, f in self.results[row.name].items()},
                }
                for row in self.rows
            ],
            "notes": self.notes,
        }

    def write_json(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")


# -- what to evaluate ------------------------------------------------------------------------------


def checkpoint_row(path: Path, name: str) -> ModelRow:
    """A checkpoint folder (verified file by file) as a row: its adapter or its full weights."""
    verify_checkpoint(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    # checkpoints/step-N in the run folder; its recorded paths hold from any working directory
    config = resolve_config(state["config"], path.parent.parent) if state.get("config") else None
    adapter = path / "adapter"
    if adapter.is_dir():
        return ModelRow(name, adapter=adapter, step=state.get("step"), config=config)
    return ModelRow(name, weights=path / "model.safetensors", step=state.get("step"), config=config)


def adapter_row(path: Path) -> ModelRow:
    """``--adapter``: a checkpoint folder, or a peft adapter folder (with its run's options when it
    is a run's `adapter/`)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return checkpoint_row(path, str(path))
    if not (path / "adapter_config.json").is_file():
        raise EvalError(
            f"--adapter `{path}` is neither a peft adapter folder (no adapter_config.json) nor a checkpoint"
            f" (no {MANIFEST}). Pass a run's `adapter/` or one of its `{CHECKPOINTS_DIR}/step-N` folders;"
            " a full model folder (a --no-lora run's `model/`) is a --model."
        )
    found = list_checkpoints(path.parent)
    config = checkpoint_row(found[-1], "").config if found else None
    return ModelRow(str(path), adapter=path, config=config)


def model_rows(cfg: EvalConfig) -> list[ModelRow]:
    """The trained rows, in the order given: adapters, then each run's checkpoints oldest first."""
    rows = [adapter_row(path) for path in cfg.adapters]
    for run in cfg.runs:
        found = list_checkpoints(run)
        if not found:
            raise EvalError(
                f"--run `{run}` has no checkpoint under {CHECKPOINTS_DIR}/; pass the --out of a `train run`"
                " (it saves at least at its last step)."
            )
        rows += [checkpoint_row(path, f"{Path(run).name}/{path.name}") for path in found]
    return rows


def run_eval_sets(rows: list[ModelRow]) -> tuple[tuple[str, Path], ...]:
    """The eval sets `train run` used for the runs the rows come from, as it chose them: its --data's
    `val` split as `val` (when the dataset has one), and each --eval-data (a bare PATH replaces `val`).
    The run recorded them absolute (`train.runpaths`); they are given relative to the working directory
    when they are under it, as a user would type them."""
    configs = [row.config for row in rows if row.config]
    found = {run_sets(c) for c in configs}
    if len(found) != 1:
        what = "the runs used different eval sets" if found else "no run's options are known"
        raise EvalError(f"give the eval sets: --data NAME=PATH (repeatable); {what}.")
    sets = found.pop()
    if not sets:
        raise EvalError(
            "the run had no eval set (no `val` split in its --data, no --eval-data); give one: --data NAME=PATH."
        )
    for name, path in sets:
        if not (path / "manifest.json").is_file():
            raise EvalError(
                f"the run's eval set {name}=`{path}` is not there (no manifest.json): moved or deleted since"
                f" the run. Give the sets where they are now: --data {name}=PATH (repeatable)."
            )
    return tuple((name, shown(path)) for name, path in sets)


def run_sets(config: dict[str, Any]) -> tuple[tuple[str, Path], ...]:
    named = named_paths(config.get("eval_data") or [], "--eval-data", bare_name="val")
    data = Path(config.get("data") or "")
    found = (data / "manifest.json").is_file()  # not found: kept, so that the caller says so
    has_val = not found or "val" in Manifest.load(data).splits
    own = (("val", data),) if has_val and "val" not in dict(named) else ()
    return own + named


def base_of(cfg: EvalConfig, rows: list[ModelRow]) -> tuple[str, int]:
    """The base model and its seed: the flags, else what the runs trained on (which must agree)."""
    configs = [row.config for row in rows if row.config]
    models = {c.get("model") for c in configs}
    seeds = {c.get("seed", 0) for c in configs}
    model = cfg.model
    if model is None:
        if len(models) != 1:
            what = f"they name {', '.join(sorted(map(str, models)))}" if models else "none names its model"
            raise EvalError(f"cannot tell the base model of the adapters given ({what}); pass --model.")
        model = str(models.pop())
        if model != TINY_QWEN2 and not (Path(model) / "config.json").is_file():
            raise EvalError(
                f"the run's model `{model}` is not there (no config.json): moved or deleted since the run."
                " Pass the model folder where it is now: --model PATH."
            )
    seed = cfg.seed
    if seed is None:
        if model == TINY_QWEN2 and len(seeds) > 1:
            raise EvalError(
                f"the runs' `tiny-qwen2` bases differ (seeds {sorted(seeds)}); evaluate them apart, or pass --seed."
            )
        seed = seeds.pop() if seeds else 0
    return model, seed


def label_of(cfg: EvalConfig, base_model: str, *, trained: bool) -> str:
    """The name of the model's row: the one given (`--model NAME=PATH`), else `base` when trained rows
    are put on it, else what the model is: its folder's name (an exported model is not a `base`)."""
    if cfg.model_name:
        return cfg.model_name
    if trained:
        return BASE
    return base_model if base_model == TINY_QWEN2 else Path(base_model).resolve().name


def other_base_note(cfg: EvalConfig, rows: list[ModelRow]) -> str | None:
    """A note when --model is not the model the trained rows were trained on (an exported model with
    the run's own adapters on it, say): they are put on it as asked, which is rarely what was meant."""
    trained_on = {row.config.get("model") for row in rows if row.config and not row.is_base}
    if cfg.model is None or not trained_on:
        return None
    given = cfg.model if cfg.model == TINY_QWEN2 else absolute(cfg.model)
    if trained_on == {given}:
        return None
    return (
        f"--model `{cfg.model}` is not the model the adapters and checkpoints were trained on"
        f" ({', '.join(f'`{m}`' for m in sorted(map(str, trained_on)))}); they were put on it as asked."
        " Leave --model out to evaluate them on their own base."
    )


# -- the eval sets ---------------------------------------------------------------------------------


def open_sets(cfg: EvalConfig, base_model: str, notes: list[str], rows: list[ModelRow]) -> list[EvalSet]:
    """Each eval set opened (sizes checked), its rows chosen, its documents rebuilt (document-level),
    and its tokenizer found (for bits per byte): --tokenizer, the base model's folder, the adapters of
    ``rows`` (a run's carry its dataset's tokenizer), the manifest's path (as given to `prep pack`,
    so perhaps relative to another folder)."""
    sets = []
    first_sha = None
    for name, path in cfg.data:
        dataset = PackedDataset(path, verify="size")
        manifest = dataset.manifest
        first_sha = first_sha or manifest.tokenizer.sha256
        if manifest.tokenizer.sha256 != first_sha:
            raise EvalError(
                f"--data {name}=`{path}` was packed with another tokenizer ({manifest.tokenizer.path}) than"
                f" {cfg.data[0][0]}=`{cfg.data[0][1]}`; one model reads one tokenizer's ids: pack both with it."
            )
        split = dataset.split(cfg.split or ("val" if "val" in dataset.split_names else "train"))
        candidates = [p for p in (cfg.tokenizer, Path(base_model), *(r.adapter for r in rows)) if p]
        tokenizer_file = find_tokenizer(manifest, candidates)
        byte_lengths = None
        if tokenizer_file is not None:
            byte_lengths = token_byte_lengths(tokenizer_file, manifest.tokenizer.vocab_size)
            if byte_lengths is None:
                notes.append(
                    f"{name}: bits/byte left out: `{tokenizer_file}` is not a byte-level BPE tokenizer."
                )
        else:
            notes.append(
                f"{name}: bits/byte left out: no tokenizer.json with sha256 {manifest.tokenizer.sha256[:12]}..."
                f" at `{manifest.tokenizer.path}` (the manifest's path); pass it with --tokenizer."
            )
        eval_set = EvalSet(
            name, Path(path), manifest, split, byte_lengths, tokenizer_file, FirstRows(split, 0)
        )
        if cfg.doc_level:
            eval_set.window = cfg.window or manifest.seq_len
            eval_set.stride = cfg.stride or max(eval_set.window // 2, 1)
            eval_set.documents, eval_set.document_rows = read_documents(
                split, max_rows=cfg.max_rows, max_tokens=cfg.max_tokens
            )
        eval_set.rows = FirstRows(split, rows_within(split, max_rows=cfg.max_rows, max_tokens=cfg.max_tokens))
        sets.append(eval_set)
    return sets


def score(model: torch.nn.Module, eval_set: EvalSet, cfg: EvalConfig, device: torch.device) -> EvalFigures:
    if cfg.doc_level:
        return evaluate_documents(
            model,
            eval_set.documents,
            window=eval_set.window,
            stride=eval_set.stride,
            batch_tokens=cfg.batch_size * eval_set.manifest.seq_len,
            device=device,
            num_rows=eval_set.document_rows,
            byte_lengths=eval_set.byte_lengths,
        )
    return evaluate_split(
        model, eval_set.rows, batch_size=cfg.batch_size, device=device, byte_lengths=eval_set.byte_lengths
    )


# -- the run ---------------------------------------------------------------------------------------


def run_eval(cfg: EvalConfig, log: Callable[[str], None] = print) -> EvalReport:
    """Every model row on every eval set; ``log`` gets a line per figure as it is computed."""
    rows = model_rows(cfg)
    base_model, seed = base_of(cfg, rows)
    if cfg.base:
        rows = [ModelRow(label_of(cfg, base_model, trained=bool(rows)), is_base=True), *rows]
        if len({row.name for row in rows}) != len(rows):
            raise EvalError(
                f"the model row's name {rows[0].name!r} is also a trained row's; name it: --model NAME=PATH."
            )
    if not rows:
        raise EvalError("nothing to evaluate: --no-base and no --adapter or --run.")
    if not cfg.data:
        cfg = dataclasses.replace(cfg, data=run_eval_sets(rows))
        log(f"eval sets of the run: {', '.join(f'{name}={path}' for name, path in cfg.data)}")
        caps = {row.config.get("eval_max_tokens") for row in rows if row.config}
        if cfg.max_rows is None and cfg.max_tokens is None and len(caps) == 1 and None not in caps:
            cfg = dataclasses.replace(cfg, max_tokens=caps.pop())  # the rows the run's evals scored
            log(f"and their leading rows up to {cfg.max_tokens:,} tokens, as the run's --eval-max-tokens")
    report = EvalReport(cfg=cfg, base_model=base_model, sets=[], rows=rows)
    if (note := other_base_note(cfg, rows)) is not None:
        report.notes.append(note)
    report.sets = open_sets(cfg, base_model, report.notes, rows)
    device = resolve_device(cfg.device)
    vocab_size = report.sets[0].manifest.tokenizer.vocab_size

    def load_base() -> torch.nn.Module:
        model = load_model(
            base_model,
            vocab_size=vocab_size,
            attn=cfg.attn,
            dtype=default_dtype(device, lora=True),
            device=device,
            seed=seed,
        )
        if input_embeddings(model).num_embeddings < vocab_size:
            raise EvalError(
                f"--model `{base_model}` embeds {input_embeddings(model).num_embeddings:,} token ids but the"
                f" eval sets' tokenizer has {vocab_size:,}; evaluate data packed with this model's tokenizer."
            )
        return model.eval()

    base = load_base()
    for row in rows:
        model = with_weights(base, row, load_base)
        report.results[row.name] = {}
        for eval_set in report.sets:
            figures = score(model, eval_set, cfg, device)
            report.results[row.name][eval_set.name] = figures
            log(describe_figures(row.name, eval_set.name, figures))
        if row.adapter is not None:
            base = model.unload()  # takes the adapter's layers out again, leaving the base as it was
    return report


def with_weights(
    base: torch.nn.Module, row: ModelRow, load_base: Callable[[], torch.nn.Module]
) -> torch.nn.Module:
    """``base`` with ``row``'s adapter put on it (undo with ``unload``), or a fresh base holding its
    full weights, or ``base`` itself."""
    if row.adapter is not None:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                # peft 0.21 calls a transformers 5 property that warns of its own deprecation: not ours.
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
                )
                return PeftModel.from_pretrained(base, row.adapter, is_trainable=False).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            raise EvalError(
                f"adapter `{row.adapter}` does not fit the base model ({str(e).splitlines()[0][:300]});"
                " pass the --model it was trained on."
            ) from None
    if row.weights is not None:
        import safetensors.torch

        model = load_base()
        missing, unexpected = safetensors.torch.load_model(model, str(row.weights), strict=False)
        if missing or unexpected:
            raise EvalError(
                f"`{row.weights}` does not fit the base model (missing {missing[:3]}, unexpected"
                f" {unexpected[:3]}); pass the --model it was trained on."
            )
        return model.eval()
    return base


def describe_figures(row: str, eval_set: str, f: EvalFigures) -> str:
    bpb = "n/a" if f.bits_per_byte is None else f"{f.bits_per_byte:.4f}"
    return (
        f"{row} | {eval_set} | loss {f.loss:.4f} | ppl {f.ppl:,.3f} | bits/byte {bpb}"
        f" | {f.num_targets:,} target tokens"
    )
