"""The tokenizer files that travel with exported weights, so that a model folder or an adapter is usable alone.

The tokenizer a dataset was packed with is named in its manifest (``tokenizer.path``, as given to `prep
pack`, and the sha256 of its ``tokenizer.json``). It is found again by that path and accepted only when
its ``tokenizer.json`` still has that sha256; then the files Hugging Face loaders read beside it (config,
special tokens, chat template) are copied next to the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.errors import DatasetError
from shared.fileio import sha256_file
from shared.manifest import Manifest

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (
    TOKENIZER_JSON,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""What `AutoTokenizer.from_pretrained` reads from a folder, chat template included (copied when present)."""


def tokenizer_folder(path: str | Path, sha256: str | None = None) -> Path | None:
    """The folder holding ``path``'s ``tokenizer.json`` (``path`` is that file or its folder), or None when
    there is none or, with ``sha256``, when its bytes are not those."""
    path = Path(path)
    folder = path.parent if path.name == TOKENIZER_JSON else path
    file = folder / TOKENIZER_JSON
    if not file.is_file() or (sha256 is not None and sha256_file(file) != sha256):
        return None
    return folder


def dataset_tokenizer(data: str | Path) -> Path | None:
    """The folder of the tokenizer packed dataset ``data`` was packed with, if it is still where the
    manifest says (relative paths are taken from the working directory) and unchanged; else None."""
    try:
        info = Manifest.load(Path(data)).tokenizer
    except (DatasetError, OSError):
        return None
    return tokenizer_folder(info.path, info.sha256)


def copy_tokenizer(source: Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer files of folder ``source`` into ``dest``; the names copied (none without a source)."""
    if source is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied
