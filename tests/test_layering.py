"""Imports flow prep -> shared <- train: the two halves never import each other, and prep never loads torch,
transformers or peft (the `train` extra installs them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ONLY = {"torch", "transformers", "peft", "safetensors"}
"""Installed by the `train` extra only, so `prep` and `shared` must run without them."""


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of ``package`` imports (statically, including lazy imports)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_static_imports_respect_the_layers():
    forbidden = {
        "prep": {"train"} | TRAIN_ONLY,
        "train": {"prep"},
        "shared": {"prep", "train"} | TRAIN_ONLY,
    }
    for package, banned in forbidden.items():
        modules = _imported_packages(package)
        assert modules, f"no modules found in {package}/"
        for module, names in modules.items():
            assert not names & banned, f"{module} imports {sorted(names & banned)}"


def test_the_scan_sees_a_forbidden_import(tmp_path, monkeypatch):
    """Negative control: a lazy `import torch` inside a function is found."""
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "bad.py").write_text("def f():\n    import torch.nn\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _imported_packages("prep") == {"prep/bad.py": {"torch"}}


def test_running_prep_loads_no_torch():
    code = (
        "import sys, prep.cli, prep.pipeline, prep.verify, prep.show, prep.card, prep.encoder;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'train') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
