"""Install what you use: `pip install packed-shards` gives `prep` without torch, transformers or peft; the
`train` extra adds them, and the `train` command says how to install it instead of showing a traceback."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"prep", "shared", "train"}
IMPORT_TO_DISTRIBUTION = {"yaml": "pyyaml", "flash_attn": "flash-attn"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _distributions(requirements: list[str]) -> set[str]:
    """Normalized distribution names of requirement strings (`torch>=2.4; ...` -> `torch`)."""
    names = set()
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
        assert match, f"unparsable requirement {requirement!r}"
        names.add(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def _third_party_imports(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Distribution names each third-party import of ``package`` needs -> the modules importing it."""
    found: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                if name in sys.stdlib_module_names or name in FIRST_PARTY:
                    continue
                dist = IMPORT_TO_DISTRIBUTION.get(name, name.replace("_", "-"))
                found.setdefault(dist, set()).add(str(path.relative_to(root)))
    return found


def test_base_install_has_no_training_stack():
    project = _project()
    training = {"torch", "transformers", "peft"}
    assert not _distributions(project["dependencies"]) & training
    assert training <= _distributions(project["optional-dependencies"]["train"])
    # dev installs what the tests need, the training stack included.
    assert "packed-shards[train]" in project["optional-dependencies"]["dev"]


def test_the_requirement_parser_sees_torch():
    """Negative control: a base list that pulls torch is caught, whatever the version syntax."""
    assert "torch" in _distributions(["numpy>=1.26", "torch>=2.4; python_version >= '3.10'"])
    assert "flash-attn" in _distributions(["flash_attn==2.6"])


def test_every_import_is_installed_by_its_extra():
    """prep and shared run on the base install (plus the optional `fast`, `ray` and `zstd` back-ends they guard);
    train on the base plus its `train` extra (and `gpu`)."""
    project = _project()
    base = _distributions(project["dependencies"])
    extras = {name: _distributions(reqs) for name, reqs in project["optional-dependencies"].items()}
    provided = {
        "shared": base,
        "prep": base | extras["fast"] | extras["ray"] | extras["zstd"],
        "train": base | extras["train"] | extras["gpu"],
    }
    for package, allowed in provided.items():
        missing = {dist: mods for dist, mods in _third_party_imports(package).items() if dist not in allowed}
        assert not missing, f"{package}/ imports what its install does not provide: {missing}"


def test_the_import_scan_sees_an_undeclared_package(tmp_path):
    """Negative control: a lazy import of an undeclared package in prep/ is found."""
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "bad.py").write_text("def f():\n    import torch.nn\n    import yaml, os\n")
    assert _third_party_imports("prep", root=tmp_path) == {
        "torch": {"prep/bad.py"},
        "pyyaml": {"prep/bad.py"},
    }


def _run_train_without(blocked: set[str], *argv: str, setup: str = "") -> subprocess.CompletedProcess:
    """Run the `train` entry point with ``blocked`` modules made unimportable, as on a base install."""
    code = f"""
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {sorted(blocked)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Missing())
sys.argv = ["train", *{list(argv)!r}]
from train.cli import app, main
{setup}
main()
"""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_train_without_its_extra_says_how_to_install_it(tmp_path):
    result = _run_train_without({"torch", "transformers", "peft"}, "run", "--data", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `torch` is not installed"), result.stderr
    assert "pip install 'packed-shards[train]'" in lines[0]


def test_train_plan_needs_no_extra():
    """`train plan` is arithmetic over a manifest: it runs on the base install."""
    result = _run_train_without({"torch", "transformers", "peft"}, "plan", "--max-steps", "10")
    assert result.returncode == 0, result.stderr


def test_an_unrelated_missing_module_is_not_hidden():
    """Negative control: only the train extra's modules become an install hint; a bug keeps its traceback."""
    setup = """
@app.command("broken")
def broken() -> None:
    import a_module_that_is_not_a_dependency  # noqa: F401
"""
    result = _run_train_without(set(), "broken", setup=setup)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "a_module_that_is_not_a_dependency" in result.stderr
    assert "packed-shards[train]" not in result.stderr
