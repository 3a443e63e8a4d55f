"""The inputs' fingerprints in a manifest, checked against the files on disk and then set apart, so that two
packs of the same records from different files (plain and compressed, say) can be compared field by field."""

from __future__ import annotations

import json
from pathlib import Path

from shared.fileio import sha256_file


def provenance_apart(manifest: Path | str | bytes, inputs: list[Path]) -> dict:
    """The manifest (a file, or its text) as a dict without its inputs' fingerprints, once each is checked
    against its file in ``inputs``: size, modification time and sha256 of the bytes on disk."""
    raw = json.loads(manifest.read_text() if isinstance(manifest, Path) else manifest)
    for info, path in zip(raw["inputs"], inputs, strict=True):
        st = Path(path).stat()
        fingerprint = (info.pop("num_bytes"), info.pop("mtime_ns"), info.pop("sha256"))
        assert fingerprint == (st.st_size, st.st_mtime_ns, sha256_file(path)), path
    return raw
