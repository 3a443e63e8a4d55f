"""`prep pack` as a library call: find the inputs, lock the output folder, and hand the run to its executor.

The stages are in prep/stages.py; prep/executor_local.py runs them on this machine (the default),
prep/executor_ray.py on a Ray cluster, with the same bytes out. docs/design.md draws the whole flow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prep.discovery import Discovery, describe, discover_inputs
from prep.executor_local import pack_local
from prep.hub import is_hub
from prep.outdir import output_lock, refuse_overlap
from prep.provenance import is_stdin
from prep.stages import PackConfig, Progress
from shared.errors import UserError
from shared.manifest import Manifest

__all__ = ["PackConfig", "Progress", "pack"]


def pack(cfg: PackConfig, progress: Progress | None = None) -> Manifest:
    """Pack ``cfg.inputs`` into ``cfg.out``; return the manifest written there."""
    progress = progress or Progress()
    found = discover_inputs(cfg.inputs, cfg.dataset_split) if cfg.mixture is None else discover_mixture(cfg)
    given = [Path(i) for i in cfg.inputs if not (is_stdin(i) or is_hub(i)) and Path(i).exists()]
    on_disk = [s.path for s in found.files if not (s.url or is_stdin(s.path) or is_hub(s.path))]
    refuse_overlap(cfg.out, given + on_disk)
    progress.message(describe(found))
    with output_lock(cfg.out):
        if cfg.executor == "ray":
            from prep.executor_ray import (
                pack_with_ray,  # Ray is an optional extra: import it only when asked for
            )

            return pack_with_ray(cfg, found, progress)
        return pack_local(cfg, found, progress)


def discover_mixture(cfg: PackConfig) -> Discovery:
    """Each source's inputs in recipe order, every file marked with its source and text field."""
    assert cfg.mixture is not None
    files, ignored, owner = [], [], {}
    for source in cfg.mixture.sources:
        found = discover_inputs(source.inputs, cfg.dataset_split)
        for f in found.files:
            if f.path in owner:
                raise UserError(
                    f"`{f.path}` is an input of both source `{owner[f.path]}` and source `{source.name}`;"
                    " give each file to one source."
                )
            owner[f.path] = source.name
            files.append(dataclasses.replace(f, text_field=source.text_field, source=source.name))
        ignored.extend(found.ignored)
    return Discovery(tuple(files), tuple(ignored))
