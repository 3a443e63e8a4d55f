"""Fixtures shared by every test folder: the bundled sample, and the real corpora beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prep.sample import write_sample

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QWEN_TOKENIZER = SHARED_DATA / "qwen2.5-tokenizer" / "tokenizer.json"
REUTERS = SHARED_DATA / "corpus" / "reuters21578" / "reuters21578.jsonl"
ECTSUM = SHARED_DATA / "corpus" / "ectsum" / "ectsum.jsonl"


def _require(path: Path) -> Path:
    """Skip without the licensed data; in CI (CI=true) its absence is a failure, not a skip."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {path} (../shared/data beside the repository)")
        pytest.skip(f"needs {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def fast_bpe_cache(tmp_path_factory) -> Path:
    """The fast engine's table cache in a folder of this session, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("fast-bpe-cache")
    before = os.environ.get("PREP_FAST_BPE_CACHE")
    os.environ["PREP_FAST_BPE_CACHE"] = str(folder)
    yield folder
    if before is None:
        del os.environ["PREP_FAST_BPE_CACHE"]
    else:
        os.environ["PREP_FAST_BPE_CACHE"] = before


@pytest.fixture(scope="session")
def qwen_tokenizer() -> Path:
    return _require(QWEN_TOKENIZER)


@pytest.fixture(scope="session")
def reuters() -> Path:
    return _require(REUTERS)


@pytest.fixture(scope="session")
def ectsum() -> Path:
    return _require(ECTSUM)


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus JSONL, tokenizer folder) of the bundled sample, written once per test session."""
    return write_sample(tmp_path_factory.mktemp("sample"))
