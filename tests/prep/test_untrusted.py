"""Untrusted files: nothing is unpickled, damaged Arrow input is refused before its offsets are used, and
`prep pack` writes nothing outside its output folder but the fast engine's table cache.

Literal special-token text inside documents staying text is tested in `test_pack.py`
(`test_literal_special_tokens_are_text*`, sample and Qwen tokenizers) and for random documents in
`test_properties.py`.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prep.cli import app

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("prep", "shared", "train")
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve"}


def _call_name(node: ast.Call) -> str:
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword_is_true(node: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords
    )


def unpickling_calls(source: str, filename: str, *, forbid_import: bool) -> list[str]:
    """Every place in ``source`` that could unpickle untrusted bytes."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if forbid_import and isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in UNPICKLERS for n in names):
                found.append(f"{where}: imports an unpickler")
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        root, _, last = name.rpartition(".")
        if root.split(".")[0] in UNPICKLERS and last in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where}: {name}()")
        elif name.endswith("torch.load") and not _keyword_is_true(node, "weights_only"):
            found.append(f"{where}: torch.load() without weights_only=True")
        elif last in ("load", "read_pickle") and _keyword_is_true(node, "allow_pickle"):
            found.append(f"{where}: {name}(allow_pickle=True)")
        elif last == "read_pickle":
            found.append(f"{where}: {name}()")
    return found


@pytest.mark.slow
def test_nothing_is_unpickled():
    problems = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            # prep and shared never import an unpickler at all; train may (to name UnpicklingError).
            problems += unpickling_calls(
                path.read_text(encoding="utf-8"), rel, forbid_import=folder != "train"
            )
    assert not problems, "unpickling of files we did not write:\n" + "\n".join(problems)


def test_the_unpickling_scan_catches_each_form():
    bad = """
import pickle
from dill import loads
import torch, numpy as np, pandas as pd
pickle.loads(b"")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
pd.read_pickle("x.pkl")
"""
    found = unpickling_calls(bad, "bad.py", forbid_import=True)
    assert len(found) == 7, found
    ok = 'import torch\ntorch.load("x.pt", weights_only=True)\n'
    assert unpickling_calls(ok, "ok.py", forbid_import=True) == []


def test_damaged_saved_dataset_is_refused_before_reading(sample, tmp_path):
    import datasets

    _, tok = sample
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["hello world", "second doc", "third"]}).save_to_disk(str(folder))
    arrow = Path(glob.glob(str(folder / "*.arrow"))[0])
    table = pa.ipc.open_stream(pa.BufferReader(arrow.read_bytes())).read_all()
    column = table.column("text").chunk(0)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32).copy()
    offsets[2] = 1_000_000  # record 1 would be read from far outside the data buffer
    bad = pa.StringArray.from_buffers(len(column), pa.py_buffer(offsets.tobytes()), column.buffers()[2])
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(pa.Table.from_arrays([bad], schema=table.schema))

    result = CliRunner().invoke(
        app, ["pack", str(folder), "--tokenizer", str(tok), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1, result.output
    assert f"dataset `{folder}`: column `text` is damaged" in result.output
    assert "out of bounds" in result.output and "save_to_disk" in result.output


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_pack_writes_nothing_outside_out_but_its_table_cache(sample, tmp_path):
    """Outside ``--out``, `prep pack` writes three files, in the user's cache folder: the fast engine's tables
    and the two sets of code points it leaves to `tokenizers` (``PREP_FAST_BPE_CACHE=off``: nothing at all)."""
    corpus, tok = sample
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "docs.jsonl").write_bytes(corpus.read_bytes())
    home, tmp, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for d in (home, tmp, cwd):
        d.mkdir()
    # The fake home starts empty: pack imports no matplotlib (its font cache would be written there).
    before_inputs, before_tok, before_home = snapshot(inputs), snapshot(tok), snapshot(home)
    env = {
        **os.environ,
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "PYTHONPATH": str(REPO),
    }
    for key in ("MPLCONFIGDIR", "HF_HOME", "HF_DATASETS_CACHE", "PREP_FAST_BPE_CACHE"):
        env.pop(key, None)
    out = tmp_path / "out"
    args = [
        "pack",
        str(inputs / "docs.jsonl"),
        "--tokenizer",
        str(tok),
        "--out",
        str(out),
        "--val-fraction",
        "0.1",
        "--overwrite",
    ]
    launch = "from prep.cli import main; main()"
    for cache in ("off", None):
        run_env = env if cache is None else {**env, "PREP_FAST_BPE_CACHE": cache}
        result = subprocess.run(
            [sys.executable, "-c", launch, *args], cwd=cwd, env=run_env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        written = {p for p in snapshot(home) if p not in before_home}
        if cache == "off":
            assert snapshot(home) == before_home, "wrote into the home folder"
        else:
            # The tables of this tokenizer, and the code points the fast engine leaves to `tokenizers`.
            assert all(p.startswith(".cache/packed-shards/fast-bpe-v1/") for p in written), written
            assert len(written) == 3 and sum(p.endswith(".npz") for p in written) == 1, written
            assert sum("/divergent-classes-" in p for p in written) == 1, written
            assert sum("/divergent-nfc-" in p for p in written) == 1, written
        assert snapshot(tmp) == {} and snapshot(cwd) == {}, "wrote into TMPDIR or the working folder"
        assert snapshot(inputs) == before_inputs and snapshot(tok) == before_tok, "changed an input"
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" in names and "README.md" in names
    assert not [n for n in names if n.startswith(".")], f"work or temp files left in --out: {names}"
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
