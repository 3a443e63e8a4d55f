"""Where a run's metrics go besides metrics.jsonl: TensorBoard and Weights & Biases, both optional.

Every record the loop writes to metrics.jsonl (`train.loop.Run.record`) also goes to :meth:`Sinks.write`,
which sends its numbers as scalars named ``KIND/FIELD`` (``train/loss``, ``train/tok_per_s``,
``eval/val/loss``, ``eval/val/ppl``: an eval record is tagged by its eval set and's ``eval_`` prefix is dropped), at the record's step. So the three
sinks hold the same figures, and a new field of a record reaches all of them.

- TensorBoard (``torch.utils.tensorboard``; the ``tensorboard`` package, the ``logging`` extra):
  ``--tensorboard`` on, ``--no-tensorboard`` off; by default on when the package is installed. Event
  files go to ``OUT/tensorboard/``. A resumed run purges the events logged after its checkpoint.
- Weights & Biases (the ``wandb`` package, not an extra): ``--wandb``. The project is
  ``$WANDB_PROJECT`` (default ``packed-shards``), the run's name the --out folder's; ``WANDB_MODE=offline``
  works without an account. The W&B run id is kept in ``OUT/wandb-run-id`` so that a resume continues it.

Both are flushed at every checkpoint and evaluation (with loss.png), so a killed run keeps what it logged.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import UserError
from train.outputs import record_kind

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"
LOGGED_KINDS = ("train", "eval")


def installed(name: str) -> bool:
    """Whether ``import name`` can work, without importing it (a module already imported counts)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def tensorboard_installed() -> bool:
    return installed("tensorboard")


def require_sinks(*, tensorboard: bool | None, wandb: bool) -> None:
    """Refuse a sink asked for but not installed, before the run loads its model."""
    if tensorboard and not tensorboard_installed():
        raise UserError(
            "--tensorboard needs the `tensorboard` package, which is not installed; run `pip install"
            " tensorboard` (or `pip install 'packed-shards[logging]'`), or drop --tensorboard."
        )
    if wandb and not installed("wandb"):
        raise UserError(
            "--wandb needs the `wandb` package, which is not installed; run `pip install wandb` (set"
            " WANDB_MODE=offline to log without an account), or drop --wandb."
        )


def scalars_of(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record as ``KIND/FIELD`` scalars (none for other kinds)."""
    kind = record_kind(entry)
    if kind not in LOGGED_KINDS:
        return {}
    prefix = kind if "eval_set" not in entry else f"{kind}/{entry['eval_set']}"
    return {
        f"{prefix}/{key.removeprefix('eval_') if kind == 'eval' else key}": float(value)
        for key, value in entry.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


@dataclass(slots=True)
class Sinks:
    """The open TensorBoard writer and W&B run of a run (rank 0), either of them absent."""

    tensorboard: Any = None
    """A ``torch.utils.tensorboard.SummaryWriter``."""
    wandb_run: Any = None
    not_opened: list[str] = field(default_factory=list)
    """Sinks that were on by default but could not open, with why: the run says so and goes on."""

    def write(self, entry: dict[str, Any]) -> None:
        scalars = scalars_of(entry)
        if not scalars:
            return
        step = entry["step"]
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    @property
    def names(self) -> list[str]:
        return [name for name, on in (("tensorboard", self.tensorboard), ("wandb", self.wandb_run)) if on]


def open_sinks(
    out: Path,
    *,
    tensorboard: bool | None,
    wandb: bool,
    start_step: int,
    resumed: bool,
    header: list[str],
    config: dict[str, Any],
) -> Sinks:
    """The sinks asked for (``tensorboard=None``: on when installed), each given the run's ``header``
    lines and ``config`` (a ``resumed`` run continues its W&B run); a sink asked for but not installed is a UserError with the install line."""
    require_sinks(tensorboard=tensorboard, wandb=wandb)
    sinks = Sinks()
    if tensorboard or (tensorboard is None and tensorboard_installed()):
        try:
            sinks.tensorboard = _open_tensorboard(out, start_step, header)
        except ImportError as e:  # installed, but broken (a protobuf or numpy it cannot use)
            if tensorboard:
                raise UserError(
                    f"--tensorboard: torch.utils.tensorboard does not import ({e}); reinstall tensorboard,"
                    " or drop --tensorboard."
                ) from None
            sinks.not_opened.append(f"tensorboard: installed but does not import ({e}); --no-tensorboard")
    if wandb:
        sinks.wandb_run = _open_wandb(out, config, resumed=resumed)
    return sinks


def _open_tensorboard(out: Path, start_step: int, header: list[str]):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: a run killed after its checkpoint logged steps that the resumed run logs again.
    writer = SummaryWriter(
        log_dir=str(out / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
    )
    writer.add_text("run", "\n".join(f"    {line}" for line in header), start_step)
    return writer


def _open_wandb(out: Path, config: dict[str, Any], *, resumed: bool):
    wandb = importlib.import_module("wandb")
    id_file = out / WANDB_ID_FILE
    if resumed and id_file.exists():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "packed-shards"),
        name=out.resolve().name,
        dir=str(out),
        id=run_id,
        resume="allow",
        config=config,
    )
