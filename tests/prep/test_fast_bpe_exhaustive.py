"""The fast engine equals `tokenizers` on every Unicode scalar value, in contexts that exercise each step.

Each code point is written into probes that reach every place its Unicode data matter: alone, between
letters, digits and spaces (the split classes), after an apostrophe (the case-insensitive contractions), and
inside out-of-order combining sequences (canonical ordering and composition). Probes are grouped into
documents, and every document is encoded by both engines. A document holding a code point of
:mod:`prep.divergence` goes to `tokenizers` by design, so those code points get documents of their own,
and the test also asserts that every other document went through tiktoken: the fast path itself is what is
compared, on all of Unicode.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from tokenizers import Tokenizer

from prep.divergence import all_scalars, divergent_code_points, pattern_atoms
from prep.encoder import reference_encode
from prep.fast_bpe import FastBPE, cache_dir

# The marks: acute (230) and dot below (220) written out of canonical order around the code point, then
# after it; "e" composes with both, so composition and reordering interact with the probed code point.
CONTEXTS = (
    "{c}",
    "a{c}a",
    " {c} ",
    "'{c}",
    "1{c}1",
    "e\u0301{c}\u0323",
    "e{c}\u0301\u0323",
    "{c}\u0323\u0301",
)
UNASSIGNED_CONTEXTS = ("{c}", "a{c}a '{c} 1{c}1", "e\u0301{c}\u0323")
"""For code points unassigned or private here (about 970k of 1.1M): every context still, fewer lines."""
PROBES_PER_DOCUMENT = 512
"""Code points per document: long enough for speed, short enough to locate a difference."""


def _documents(points: np.ndarray) -> list[str]:
    chars = [chr(c) for c in points.tolist()]
    full, short = "\n".join(CONTEXTS), "\n".join(UNASSIGNED_CONTEXTS)
    probes = [(short if unicodedata.category(c) in ("Cn", "Co") else full).format(c=c) for c in chars]
    return [
        "\n".join(probes[i : i + PROBES_PER_DOCUMENT]) for i in range(0, len(probes), PROBES_PER_DOCUMENT)
    ]


def _reference(path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _first_difference(fast: FastBPE, reference: Tokenizer, document: str) -> str:
    for line in document.split("\n"):
        got = fast.encode_batch([line]).ids.tolist()
        want = reference.encode(line, add_special_tokens=False).ids
        if got != want:
            return f"{line!r}: fast {got}, tokenizers {want}"
    return "only the whole document differs"


def _assert_every_scalar(path) -> None:
    fast, reference = FastBPE(path), _reference(path)
    scalars = all_scalars()
    divergent = np.isin(scalars, divergent_code_points(*_pattern_and_nfc(fast), cache_dir()))
    for points, must_refer in ((scalars[~divergent], False), (scalars[divergent], True)):
        documents = _documents(points)
        before = fast.num_referred
        got = fast.encode_batch(documents)
        want = reference_encode(reference, documents)
        assert fast.num_referred - before == (len(documents) if must_refer else 0)
        if np.array_equal(got.lengths, want.lengths) and np.array_equal(got.ids, want.ids):
            continue
        starts = np.concatenate([[0], np.cumsum(got.lengths)]), np.concatenate([[0], np.cumsum(want.lengths)])
        for k, document in enumerate(documents):
            a = got.ids[starts[0][k] : starts[0][k + 1]]
            b = want.ids[starts[1][k] : starts[1][k + 1]]
            if not np.array_equal(a, b):
                pytest.fail(f"document {k}: {_first_difference(fast, reference, document)}")


def _pattern_and_nfc(fast: FastBPE) -> tuple[str, bool]:
    from prep.fast_bpe import derive_tables

    nfc, pattern, *_ = derive_tables(fast.path)
    return pattern, nfc


@pytest.mark.slow
def test_every_scalar_value_sample_tokenizer(sample):
    _, folder = sample
    _assert_every_scalar(folder / "tokenizer.json")


@pytest.mark.slow
@pytest.mark.corpus
def test_every_scalar_value_qwen(qwen_tokenizer):
    _assert_every_scalar(qwen_tokenizer)


def test_the_issue_example_goes_to_the_reference(qwen_tokenizer):
    """A combining mark of Unicode 14 out of canonical order: NFC differs between the two libraries."""
    fast, reference = FastBPE(qwen_tokenizer), _reference(qwen_tokenizer)
    texts = ["x" * 26_000, "caf\u00e9\u0301\u0898\u0323"]
    got = fast.encode_batch(texts)
    assert fast.num_referred == 1
    np.testing.assert_array_equal(got.ids, reference_encode(reference, texts).ids)


@pytest.mark.slow
def test_divergence_probe_finds_a_known_difference(monkeypatch, tmp_path):
    """Negative control: the probe must report a code point whose NFC is made to differ."""
    from prep import divergence

    real = unicodedata.normalize

    def skewed(form, text):  # pretend this Python thinks U+00E9 decomposes under NFC
        return real(form, text).replace("\u00e9", "e\u0301") if form == "NFC" else real(form, text)

    monkeypatch.setattr(divergence.unicodedata, "normalize", skewed)
    points = divergence.divergent_code_points("\\p{L}", nfc=True, folder=None)
    assert 0xE9 in points.tolist()


@pytest.mark.slow
def test_divergence_cache_is_checked(tmp_path):
    """A cached set whose digest does not match is computed again, never used."""
    from prep import divergence

    first = divergence.divergent_code_points("\\s+", nfc=False, folder=tmp_path)
    (cached,) = tmp_path.glob("divergent-classes-*.npy")
    stored = np.load(cached)
    np.save(cached, np.concatenate([stored, np.array([ord("a")], dtype=np.uint64)]))
    again = divergence.divergent_code_points("\\s+", nfc=False, folder=tmp_path)
    np.testing.assert_array_equal(first, again)
    assert ord("a") not in again.tolist()


def test_pattern_atoms_cover_the_supported_patterns():
    from prep.fast_bpe import GPT2_PATTERN

    qwen = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    assert {r"\p{L}", r"\p{N}", r"\s"} <= set(pattern_atoms(qwen))
    assert "(?i:s)" in pattern_atoms(qwen) and "(?i:t)" in pattern_atoms(qwen)
    assert {r"\p{L}", r"\p{N}", r"\s"} <= set(pattern_atoms(GPT2_PATTERN))
    for bad in (r"\b\w+\b", r"\X", r"[[:alpha:]]+", r"(\w)\1"):
        with pytest.raises(Exception, match="split pattern"):
            pattern_atoms(bad)
