"""Hugging Face datasets by name (``hf:ORG/NAME``), read through `datasets.load_dataset` from its cache.

The prefix is what makes an input a dataset name: a path that does not exist stays an error about the path
(or a glob), never a Hub lookup. ``--dataset-split`` chooses the split; a dataset with one split needs
none. Where the data comes from is the user's `datasets` configuration, not ours: with
``HF_DATASETS_OFFLINE=1`` (and ``HF_HUB_OFFLINE=1``) `datasets` reads its local cache
(``HF_DATASETS_CACHE``) and never the network; otherwise it may download. The records are read from the
split's Arrow files in the cache, which the fingerprint covers (prep/provenance.py), as for a saved dataset.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.errors import UserError

PREFIX = "hf:"
FORMAT = "hf-dataset"


class HubError(UserError):
    """A dataset named by ``hf:NAME`` cannot be loaded as asked."""


def is_hub(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


def hub_name(spec: str | Path) -> str:
    """``ORG/NAME`` of ``hf:ORG/NAME``, once it looks like a dataset id."""
    name = str(spec)[len(PREFIX) :]
    parts = name.split("/")
    if not name or len(parts) > 2 or not all(parts) or name.startswith("/"):
        raise HubError(
            f"input `{spec}` is not a dataset name: write `hf:ORG/NAME` (or `hf:NAME`), the id `datasets."
            "load_dataset` takes. For a file inside a Hub repository use its URL, `hf://datasets/ORG/NAME/FILE`."
        )
    return name


@lru_cache(maxsize=8)
def load(name: str) -> Any:
    """`datasets.load_dataset(name)`: every split, memory-mapped from the cache (kept for the run's other reads)."""
    import datasets

    try:
        return datasets.load_dataset(name)
    except Exception as e:  # datasets raises many types: not cached, offline, no such repo, a damaged cache
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        where = os.environ.get("HF_DATASETS_CACHE") or "the default cache (~/.cache/huggingface/datasets)"
        raise HubError(
            f"dataset `{name}` cannot be loaded ({type(e).__name__}: {str(e)[:200]})."
            + (
                f" Offline, `datasets` reads only its cache, {where}: load it there once with"
                f" `datasets.load_dataset({name!r})` on a machine online, or check the name."
                if offline
                else " Check the name; `datasets` reads its cache and, online, the Hub (set"
                " HF_DATASETS_OFFLINE=1 to read the cache alone)."
            )
        ) from e


def splits(name: str) -> list[str]:
    return list(load(name))


def split(name: str, split_name: str) -> Any:
    """The split ``split_name`` of the dataset ``name`` (a `datasets.Dataset`)."""
    loaded = load(name)
    if split_name not in loaded:
        raise HubError(
            f"dataset `hf:{name}` has no split `{split_name}` (its splits: {', '.join(loaded)}); choose one"
            " with `--dataset-split`."
        )
    return loaded[split_name]


def arrow_files(name: str, split_name: str) -> list[Path]:
    """The cache's Arrow files of one split, in the order the dataset reads them."""
    return [Path(f["filename"]) for f in split(name, split_name).cache_files]
