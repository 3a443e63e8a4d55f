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


CORPUS_FIXTURES = {"qwen_tokenizer", "reuters", "ectsum"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs ../shared/data is a `corpus` test, marked by hand or not, so that
    `-m "not corpus"` leaves out exactly those (the fixtures below are how tests reach the data)."""
    for item in items:
        if CORPUS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.corpus)


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
