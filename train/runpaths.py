"""A run's recorded paths: absolute when a run records them, resolved against its start folder when old.

A run records its options in each checkpoint's ``state.json``; `train eval --run`, `train export` and
`train run --resume` read them back, perhaps from another folder than the one the run started in. So
the paths among them (:data:`PATH_OPTIONS`: the data, the eval sets, the model folder, the initial
adapter) are recorded absolute, and ``run.json`` records the folder the run started in.

Runs recorded before that kept each path as it was given, relative to the folder the run started in.
:func:`start_folder` finds that folder: the one ``run.json`` records, else the one the run's own
recorded ``--out`` implies (a run folder ``/a/b/runs/r1`` recorded as ``runs/r1`` started in ``/a/b``),
else the run folder's parent; :func:`resolve_config` makes every relative path absolute from there. A
path that is still not found is the caller's to report, naming the path and the flag that replaces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from train.model import TINY_QWEN2
from train.runinfo import RUN_JSON

PATH_OPTIONS = ("data", "model", "init_adapter", "eval_data")
"""The options of `train.config.RunConfig` that name files, as recorded (eval_data as NAME=PATH)."""


def absolute(path: str | Path) -> str:
    """``path`` made absolute from the working directory, without following links (the name the user
    gave, rooted)."""
    return os.path.abspath(path)


def absolute_config(config: dict[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """The recorded options ``config`` (`train.resume.jsonable_config`'s form) with every path of
    :data:`PATH_OPTIONS` absolute: relative ones are taken from ``root`` (default the working
    directory). `tiny-qwen2` is a name, not a path."""
    root = Path.cwd() if root is None else Path(root)

    def rooted(path: str) -> str:
        return absolute(root / path)

    config = dict(config)
    for name in ("data", "init_adapter"):
        if config.get(name):
            config[name] = rooted(config[name])
    if config.get("model") and config["model"] != TINY_QWEN2:
        config["model"] = rooted(config["model"])
    if config.get("eval_data"):
        pairs = [value.partition("=") for value in config["eval_data"]]
        config["eval_data"] = [f"{name}={rooted(path)}" if sep else rooted(name) for name, sep, path in pairs]
    return config


def start_folder(run_dir: Path, config: dict[str, Any]) -> Path:
    """The folder run ``run_dir`` started in (the module docstring's order)."""
    try:
        starts = json.loads((Path(run_dir) / RUN_JSON).read_text(encoding="utf-8"))["starts"]
        recorded = [s["working_dir"] for s in starts if s.get("working_dir")]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = []
    if recorded:
        return Path(recorded[0])
    run_dir = Path(absolute(run_dir))
    out = Path(config.get("out") or "")
    if out.parts and not out.is_absolute() and ".." not in out.parts:
        parts = run_dir.parts
        if len(parts) > len(out.parts) and parts[-len(out.parts) :] == out.parts:
            return Path(*parts[: -len(out.parts)])
    return run_dir.parent


def resolve_config(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Run ``run_dir``'s recorded options with every path absolute: as recorded, or (an old run's
    relative ones) from the folder it started in."""
    return absolute_config(config, start_folder(run_dir, config))


def shown(path: str | Path) -> Path:
    """``path`` as a person reads it: relative to the working directory when under it, else absolute."""
    path = Path(absolute(path))
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
