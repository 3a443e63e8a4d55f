"""The fast encoder gives `tokenizers`' ids exactly, refuses what it cannot reproduce, and falls back."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer

import prep.encoder as encoder_module
import prep.fast_bpe as fast_bpe_module
from prep.encoder import (
    FAST,
    REFERENCE,
    Encoder,
    JsonlChunk,
    ReferenceProcess,
    build_fast,
    first_mismatch,
    reference_encode,
    start_reference,
)
from prep.fast_bpe import (
    GPT2_PATTERN,
    EncodedBatch,
    FastBPE,
    Unsupported,
    cache_dir,
    derive_tables,
    fast_pattern,
)
from prep.readers import InputFile, Record, read_jsonl_chunks, read_records, summarize
from prep.tokenizer import TokenizerError, load_tokenizer
from shared.errors import UserError
from shared.fileio import sha256_file

TRICKY = [
    "",
    "plain words, numbers 12345 and 3.14159",
    "a literal <|endoftext|> and <|im_start|>user ... <|im_end|> stay text",
    'non-special added tokens: <tool_call>{"name": 1}</tool_call> and <|fim_prefix|>x<|fim_middle|>',
    "<tool_call><tool_call></tool_call>",
    "<|endoftext|><tool_call><|endoftext|>",
    "<tool_call",
    "<<tool_call>>",
    "NFC: cafe\u0301 vs caf\u00e9, A\u030a vs \u00c5, \u1100\u1161 (jamo), \u212b (angstrom)",
    "<tool_call>e\u0301",
    "windows\r\nline\r\n\r\nendings\r",
    "emoji \U0001f600 \U0001f469\u200d\U0001f469\u200d\U0001f467 flags \U0001f1e9\U0001f1ea and \u2764\ufe0f",
    "spaces" + " " * 300 + "then tabs" + "\t" * 50 + "\n" * 40 + "end",
    "   leading and trailing   ",
    "CONTRACTIONS: IT'S, we'RE, they'Ve, I'M, you'LL, he'D, don'T",
    "mixed scripts: \u4e2d\u6587\u5206\u8bcd \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u05e2\u05d1\u05e8\u05d9\u05ea",
    "code:\n    def f(x):\n\treturn x**2  # comment\n",
    "\u00a0non\u2009breaking\u3000spaces",
    "lone surrogate-free astral \U00010348 and private use \ue000",
]


def _reference(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _assert_same(fast: FastBPE, reference: Tokenizer, texts: list[str]) -> None:
    got = fast.encode_batch(texts)
    want = reference_encode(reference, texts)
    assert got.ids.dtype == np.int32 and got.lengths.dtype == np.int64
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.ids, want.ids)


@pytest.fixture(autouse=True)
def no_engine_kept(monkeypatch):
    """Each test builds its own encoder: none kept from an earlier test (see test_the_last_engine_is_kept)."""
    monkeypatch.setattr(encoder_module, "_last_built", None)


@pytest.fixture(scope="module")
def sample_tok(sample) -> Path:
    """The sample tokenizer plus a non-special added token, as Qwen has (``<tool_call>``)."""
    _, folder = sample
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    path = folder.parent / "sample-with-added.json"
    tokenizer.save(str(path))
    return path


def test_sample_tokenizer_ids_identical(sample, sample_tok):
    corpus, _ = sample
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    _assert_same(FastBPE(sample_tok), _reference(sample_tok), texts + TRICKY)


@pytest.fixture(scope="module")
def sample_pair(sample_tok) -> tuple[FastBPE, Tokenizer]:
    return FastBPE(sample_tok), _reference(sample_tok)


_PIECES = [
    "a",
    "e\u0301",
    " ",
    "  ",
    "\r\n",
    "\t",
    "'s",
    "'S",
    "1",
    "<|endoftext|>",
    "<tool_call>",
    "<",
    "\U0001f600",
    "\u00e9",
    "Z",
    "\n",
    "\u00a0",
    "\u3000",
    "42",
    ".",
    "!?",
    "'LL",
]
_GENERATED_TEXT = st.lists(st.sampled_from(_PIECES), max_size=40).map("".join)
"""Texts made of the pieces where splitting and merging go wrong: whitespace runs, contractions, marks."""


@settings(max_examples=150, deadline=None)
@given(text=_GENERATED_TEXT)
def test_sample_tokenizer_ids_identical_on_generated_text(sample_pair, text):
    _assert_same(*sample_pair, [text])


QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def test_fast_pattern_groups_the_alternatives_before_the_whitespace_tail():
    assert fast_pattern(GPT2_PATTERN) == (
        r"(?:'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+)|\s+(?!\S)|\s+"
    )
    assert fast_pattern(QWEN2_PATTERN).startswith("(?:(?i:'s|")
    assert LLAMA3_PATTERN != QWEN2_PATTERN and fast_pattern(LLAMA3_PATTERN).startswith("(?:(?i:'s|")
    # Left as they are: another ending, an escaped `|` (odd backslashes), verbose mode, nothing before.
    for pattern in (
        r"\p{L}+|\s+",
        r"a\|\s+(?!\S)|\s+",
        r"a\\\|\s+(?!\S)|\s+",
        r"(?x)a # note|\s+(?!\S)|\s+",
        r"(?ix:a)|\s+(?!\S)|\s+",
        r"(?-u)a|\s+(?!\S)|\s+",
        r"(?i)a|\s+(?!\S)|\s+",
        r"|\s+(?!\S)|\s+",
    ):
        assert fast_pattern(pattern) == pattern
    assert fast_pattern(r"a\\|\s+(?!\S)|\s+") == r"(?:a\\)|\s+(?!\S)|\s+"  # `\\` is a backslash


@pytest.fixture(scope="module")
def flat_and_grouped(sample_tok) -> dict[str, tuple]:
    """tiktoken with each pattern as written and as :func:`fast_pattern` rewrites it, same ranks."""
    import tiktoken

    _, _, ranks, _, _ = derive_tables(sample_tok)
    return {
        name: tuple(
            tiktoken.Encoding(name, pat_str=p, mergeable_ranks=ranks, special_tokens={})
            for p in (pattern, fast_pattern(pattern))
        )
        for name, pattern in (("gpt2", GPT2_PATTERN), ("qwen2", QWEN2_PATTERN), ("llama3", LLAMA3_PATTERN))
    }


@settings(max_examples=300, deadline=None)
@given(text=_GENERATED_TEXT)
def test_grouped_pattern_splits_as_written(flat_and_grouped, text):
    for flat, grouped in flat_and_grouped.values():
        assert grouped.encode_ordinary(text) == flat.encode_ordinary(text)


def test_grouped_pattern_splits_as_written_on_tricky_text(flat_and_grouped):
    for flat, grouped in flat_and_grouped.values():
        for text in TRICKY:
            assert grouped.encode_ordinary(text) == flat.encode_ordinary(text)


@pytest.fixture(scope="module")
def qwen_pair(qwen_tokenizer) -> tuple[FastBPE, Tokenizer]:
    return FastBPE(qwen_tokenizer), _reference(qwen_tokenizer)


def test_qwen_tricky_strings_identical(qwen_pair):
    fast, reference = qwen_pair
    _assert_same(fast, reference, TRICKY)
    # The non-special added token is one id, and special-token text is never its special id.
    ids = fast.encode_batch(["<tool_call><|endoftext|>"]).ids
    assert ids[0] == 151657 and 151643 not in ids.tolist()


def test_qwen_reuters_slice_identical(qwen_pair, reuters):
    fast, reference = qwen_pair
    with open(reuters, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in islice(f, 400)]
    _assert_same(fast, reference, texts)


def _edited(path: Path, tmp_path: Path, edit) -> Path:
    spec = json.loads(path.read_text(encoding="utf-8"))
    edit(spec)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(spec), encoding="utf-8")
    return out


def _add_unreachable_merge(spec: dict) -> None:
    """Append a merge (x, y) whose result its own characters never reach: `tokenizers` merges them otherwise."""
    from tokenizers.models import BPE

    model = spec["model"]
    vocab, merges = model["vocab"], model["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    bpe = BPE(vocab=vocab, merges=pairs)
    for x, y in ((a + b, c) for a, b in pairs[:200] for c in ("e", "s", "t")):
        if x + y not in vocab and [t.value for t in bpe.tokenize(x + y)] != [x, y]:
            vocab[x + y] = max(vocab.values()) + 1
            merges.append([x, y] if isinstance(merges[0], list) else f"{x} {y}")
            return
    raise AssertionError("no merge to make unreachable")


@pytest.mark.parametrize(
    "edit, reason",
    [
        (_add_unreachable_merge, "not what its own merges make"),
        (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
        (lambda s: s["model"].update(type="WordPiece"), "model"),
        (lambda s: s["model"]["merges"].append(s["model"]["merges"][-1]), "more than one merge"),
        (
            lambda s: s["added_tokens"].append(
                {**s["added_tokens"][0], "id": 5000, "special": False, "lstrip": True}
            ),
            "lstrip",
        ),
    ],
)
def test_unsupported_tokenizers_are_refused(sample_tok, tmp_path, edit, reason):
    with pytest.raises(Unsupported, match=reason):
        FastBPE(_edited(sample_tok, tmp_path, edit))


def test_check_catches_a_wrong_id(sample_tok):
    """Negative control for the per-batch check: one flipped id in a checked document is reported."""
    fast, reference = FastBPE(sample_tok), _reference(sample_tok)
    texts = ["The board reported steady demand.", "plain", "a <tool_call> in the tail"]
    added_docs: list[int] = []
    good = fast.encode_batch(texts, added_docs)
    assert added_docs == [i for i, t in enumerate(texts) if fast.has_added_token(t)] == [2]
    for reported in (None, added_docs):  # found by the check itself, or as the encoder reported them
        assert first_mismatch(fast, reference, texts, good, reported) is None
        for doc in (0, 2):  # the leading sample, and a document checked because it holds an added token
            ids = good.ids.copy()
            ids[int(np.cumsum(good.lengths)[doc]) - 1] += 1
            bad = EncodedBatch(ids, good.lengths)
            assert "document" in first_mismatch(fast, reference, texts, bad, reported)


class _Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(text)


def _texts(sample) -> list[list[str]]:
    corpus, _ = sample
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    return [texts[i : i + 50] for i in range(0, len(texts), 50)]


@pytest.mark.parametrize("workers", [1, 2])
def test_engine_matches_reference_in_order(sample, sample_tok, workers):
    tok = load_tokenizer(sample_tok, eos_token="<|endoftext|>")
    notes = _Notes()
    batches = _texts(sample)
    encoder = Encoder(tok, workers=workers, notice=notes)
    assert encoder.name == FAST
    out = list(encoder.map(enumerate(batches)))
    assert [i for i, _ in out] == list(range(len(batches)))
    for (_, got), texts in zip(out, batches, strict=True):
        want = reference_encode(tok.tokenizer, texts)
        np.testing.assert_array_equal(got.ids, want.ids)
    assert encoder.num_checked_batches == len(batches) and notes.lines == []


@pytest.mark.parametrize("workers", [1, 2])
def test_engine_falls_back_when_ids_differ(sample, sample_tok, workers, monkeypatch):
    original = FastBPE.encode_batch

    def off_by_one(self, texts, added_docs=None):
        got = original(self, texts, added_docs)
        return EncodedBatch(got.ids + 1, got.lengths)

    monkeypatch.setattr(FastBPE, "encode_batch", off_by_one)
    tok = load_tokenizer(sample_tok, eos_token="<|endoftext|>")
    notes = _Notes()
    batches = _texts(sample)
    encoder = Encoder(tok, workers=workers, notice=notes)
    out = list(encoder.map(enumerate(batches)))
    for (_, got), texts in zip(out, batches, strict=True):
        np.testing.assert_array_equal(got.ids, reference_encode(tok.tokenizer, texts).ids)
    assert encoder.name == REFERENCE
    assert len(notes.lines) == 1 and "disagreed" in notes.lines[0]


def _assert_reference_with_notice(path: Path, *said: str) -> None:
    """An encoder for ``path`` runs `tokenizers`, and its one notice says each of ``said``."""
    notes = _Notes()
    encoder = Encoder(load_tokenizer(path, eos_token="<|endoftext|>"), notice=notes)
    assert encoder.name == REFERENCE and len(notes.lines) == 1
    assert all(part in notes.lines[0] for part in said), notes.lines
    [(_, got)] = list(encoder.map([(0, ["Hello World"])]))
    np.testing.assert_array_equal(got.ids, reference_encode(encoder.tok.tokenizer, ["Hello World"]).ids)


def test_engine_falls_back_for_unsupported_tokenizer(sample_tok, tmp_path):
    path = _edited(sample_tok, tmp_path, lambda s: s.update(normalizer={"type": "Lowercase"}))
    _assert_reference_with_notice(path, "does not support", "normalizer 'Lowercase'")


def test_engine_without_tiktoken_says_how_to_get_it(sample_tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now raises ImportError
    _assert_reference_with_notice(sample_tok, "packed-shards[fast]")


def test_the_cache_is_on_by_default_in_the_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PREP_FAST_BPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "packed-shards" / "fast-bpe-v1"
    for off in ("off", "0", ""):
        monkeypatch.setenv("PREP_FAST_BPE_CACHE", off)
        assert cache_dir() is None
    monkeypatch.setenv("PREP_FAST_BPE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "fast-bpe-v1"


def test_a_damaged_or_unwritable_cache_costs_time_never_a_wrong_table(sample_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PREP_FAST_BPE_CACHE", str(tmp_path / "cache"))
    fresh = derive_tables(sample_tok)
    [cached] = cache_dir().glob("*.npz")
    good = cached.read_bytes()
    blob_at = good.index(b"blob.npy") + 400  # inside the token bytes (np.savez does not compress)
    flipped = good[:blob_at] + bytes([good[blob_at] ^ 1]) + good[blob_at + 1 :]
    for damage in (lambda b: b[: len(b) // 2], lambda b: flipped):
        cached.write_bytes(damage(good))
        assert cached.read_bytes() != good
        again = derive_tables(sample_tok)
        assert again[2] == fresh[2] and again[:2] == fresh[:2] and again[4] == fresh[4]
        np.testing.assert_array_equal(again[3], fresh[3])
        assert cached.read_bytes() == good  # rewritten
    monkeypatch.setenv("PREP_FAST_BPE_CACHE", str(cached))  # a file where the folder should be
    assert derive_tables(sample_tok)[2] == fresh[2]


def test_an_edited_cache_is_never_used(sample_tok, tmp_path, monkeypatch):
    """A cache rewritten as a valid file with swapped ids (zip CRCs fine) fails its digest and is derived again."""
    monkeypatch.setenv("PREP_FAST_BPE_CACHE", str(tmp_path))
    fresh = derive_tables(sample_tok)
    [cached] = cache_dir().glob("*.npz")
    with np.load(cached) as z:
        arrays = {name: z[name] for name in z.files}
    arrays["rank_to_id"] = arrays["rank_to_id"].copy()
    arrays["rank_to_id"][[300, 301]] = arrays["rank_to_id"][[301, 300]]  # two merged tokens' ids swapped
    with open(cached, "wb") as f:
        np.savez(f, **arrays)
    again = derive_tables(sample_tok)
    np.testing.assert_array_equal(again[3], fresh[3])
    with np.load(cached) as z:  # rewritten with the right tables
        np.testing.assert_array_equal(z["rank_to_id"], fresh[3])


@pytest.mark.slow
def test_a_million_spaces_go_to_the_reference_without_a_panic(sample_tok, capfd):
    """tiktoken's regex encoder panics on ~1M whitespace characters; the encoder leaves such texts to `tokenizers`."""
    fast, reference = FastBPE(sample_tok), _reference(sample_tok)
    texts = ["a" + ch * 1_000_000 + "b" for ch in (" ", "\t", "\u00a0")] + ["after: plain text still fast"]
    _assert_same(fast, reference, texts)
    assert fast.num_referred == 3
    assert "panicked" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_panic_in_tiktoken_is_left_to_the_reference(sample_tok, monkeypatch):
    """Second line behind the whitespace rule: a text tiktoken's regex engine panics on goes to `tokenizers`."""
    monkeypatch.setattr(fast_bpe_module, "LONG_WHITESPACE", re.compile(r"(?!)"))  # never matches
    fast, reference = FastBPE(sample_tok), _reference(sample_tok)
    _assert_same(fast, reference, ["before", "a" + " " * 1_000_000 + "b", "after"])
    assert fast.num_referred == 1


@pytest.mark.slow
def test_cached_tables_give_the_same_engine(sample_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PREP_FAST_BPE_CACHE", str(tmp_path))
    texts = TRICKY + ["The board reported steady demand."]
    first = FastBPE(sample_tok)  # derives the tables and writes the cache
    assert list(cache_dir().glob("*.npz"))
    second = FastBPE(sample_tok)  # reads them back
    np.testing.assert_array_equal(first.encode_batch(texts).ids, second.encode_batch(texts).ids)
    assert first.encoding._mergeable_ranks == second.encoding._mergeable_ranks
    # Given the file's sha256, a cache hit reads nothing else: not even the file.
    gone = derive_tables(tmp_path / "missing.json", sha256_file(sample_tok))
    assert gone[2] == first.encoding._mergeable_ranks


def _reference_process(path: Path, **kw) -> ReferenceProcess:
    process = start_reference(path, eos_token=kw.get("eos_token", "<|endoftext|>"), bos_token=None, workers=2)
    assert process is not None
    return process


def test_the_reference_process_loads_the_tokenizer_and_checks_every_batch(sample_tok, monkeypatch):
    process = _reference_process(sample_tok)
    tok = process.loaded()
    assert tok.info == load_tokenizer(sample_tok, eos_token="<|endoftext|>").info
    encoder = Encoder(tok, workers=2, fast=build_fast(sample_tok), reference=process)
    batches = [TRICKY[i : i + 5] for i in range(0, len(TRICKY), 5)]
    out = list(encoder.map(enumerate(batches)))
    assert encoder.name == FAST and encoder.num_checked_batches == len(batches)
    assert tok._tokenizer is None  # this process never loaded the `tokenizers` model
    for (_, got), texts in zip(out, batches, strict=True):
        np.testing.assert_array_equal(got.ids, reference_encode(_reference(sample_tok), texts).ids)
    # Negative control: a wrong fast encoder is caught by the reference process's check.
    original = FastBPE.encode_batch
    monkeypatch.setattr(
        FastBPE, "encode_batch", lambda self, t, a=None: EncodedBatch(*_shifted(original(self, t, a)))
    )
    notes = _Notes()
    process = _reference_process(sample_tok)
    encoder = Encoder(process.loaded(), workers=2, notice=notes, reference=process)
    [(_, got)] = list(encoder.map([(0, TRICKY)]))
    assert encoder.name == REFERENCE and "disagreed (document 1 of the batch" in notes.lines[0]
    np.testing.assert_array_equal(got.ids, reference_encode(_reference(sample_tok), TRICKY).ids)


@pytest.mark.slow
def test_workers_get_their_first_jobs_before_the_tokenizer_is_resolved(sample_tok, monkeypatch):
    original = encoder_module.load_tokenizer
    monkeypatch.setattr(
        encoder_module, "load_tokenizer", lambda *a, **k: (time.sleep(3), original(*a, **k))[1]
    )
    process = _reference_process(sample_tok)  # forked with the slow loader: 3 s before it knows the EOS
    encoder = Encoder(workers=2, fast=build_fast(sample_tok), reference=process)
    taken: list[int] = []
    jobs = ((taken.append(i), (i, TRICKY[i:] + TRICKY[:i]))[1] for i in range(6))
    results = encoder.map(jobs)
    assert taken == [0, 1, 2, 3] and encoder._tok is None  # two jobs per worker handed out, EOS unknown
    assert encoder.tok.info.eos_token == "<|endoftext|>"  # waits for the reference process
    for i, got in results:
        texts = TRICKY[i:] + TRICKY[:i]
        np.testing.assert_array_equal(got.ids, reference_encode(_reference(sample_tok), texts).ids)
    assert taken == list(range(6)) and encoder.num_checked_batches == 6


def test_closing_the_reference_process_mid_request_does_not_hang(sample_tok):
    process = _reference_process(sample_tok)
    process.loaded()
    # Ctrl-C while a large request is being sent: the length header and part of the payload arrive.
    os.write(process._conn.fileno(), struct.pack("!i", 1000) + b"x" * 10)
    child = process._process
    process.close()  # returns: the process sees EOF, as only this one held the other end
    assert child.exitcode is not None


def test_a_check_before_loaded_waits_for_the_info_first(sample_tok):
    """Negative control for the message order: the first message on the pipe is the info, not a verdict."""
    process = _reference_process(sample_tok)
    notes = _Notes()
    encoder = Encoder(load_tokenizer(sample_tok, eos_token="<|endoftext|>"), notice=notes, reference=process)
    [(_, got)] = list(encoder.map([(0, TRICKY)]))
    assert encoder.name == FAST and not notes.lines and encoder.num_checked_batches == 1


def test_an_input_error_while_handing_out_the_first_jobs_comes_with_the_results(sample_tok):
    encoder = Encoder(load_tokenizer(sample_tok, eos_token="<|endoftext|>"), workers=2)

    def jobs():
        yield 0, TRICKY
        raise UserError("bad input file")

    results = encoder.map(jobs())  # raises nothing yet: the caller checks the tokenizer and --out first
    assert next(results)[0] == 0
    with pytest.raises(UserError, match="bad input file"):
        next(results)
    assert encoder._pool is None  # closed with the error


def test_the_reference_process_raises_what_load_tokenizer_raises(sample_tok, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    cases = [(tmp_path / "missing.json", {}), (broken, {}), (sample_tok, {"eos_token": "<|nope|>"})]
    for path, kw in cases:
        with pytest.raises(TokenizerError) as here:
            load_tokenizer(path, eos_token=kw.get("eos_token", "<|endoftext|>"))
        assert isinstance(build_fast(path), Exception) or kw
        with pytest.raises(TokenizerError) as there:
            _reference_process(path, **kw).loaded()
        assert str(there.value) == str(here.value)


def test_a_killed_reference_process_costs_time_never_a_check(sample_tok):
    """Negative control: killed before or after loading, the checks still run (in this process)."""
    process = _reference_process(sample_tok)
    os.kill(process._process.pid, signal.SIGKILL)
    assert process.loaded().info == load_tokenizer(sample_tok, eos_token="<|endoftext|>").info
    process = _reference_process(sample_tok)
    tok = process.loaded()
    os.kill(process._process.pid, signal.SIGKILL)
    encoder = Encoder(tok, workers=2, reference=process)
    [(_, got)] = list(encoder.map([(0, TRICKY)]))
    assert encoder.name == FAST and encoder.num_checked_batches == 1 and tok._tokenizer is not None
    np.testing.assert_array_equal(got.ids, reference_encode(_reference(sample_tok), TRICKY).ids)
    # An encoder made without the tokenizer (as pack makes it) keeps it when the process dies.
    process = _reference_process(sample_tok)
    encoder = Encoder(workers=2, fast=build_fast(sample_tok), reference=process)
    process.loaded()
    os.kill(process._process.pid, signal.SIGKILL)
    [(_, got)] = list(encoder.map([(0, TRICKY)]))
    assert encoder.name == FAST and encoder.num_checked_batches == 1
    np.testing.assert_array_equal(got.ids, reference_encode(_reference(sample_tok), TRICKY).ids)


def test_the_last_engine_is_kept_for_the_same_tokenizer_only(sample_tok, tmp_path):
    tok = load_tokenizer(sample_tok, eos_token="<|endoftext|>")
    first = Encoder(tok, fast=build_fast(sample_tok))
    assert Encoder(tok).fast is first.fast is build_fast(sample_tok)
    edited = _edited(sample_tok, tmp_path, lambda s: s["model"]["merges"].pop())
    other = Encoder(load_tokenizer(edited, eos_token="<|endoftext|>"))
    assert other.fast is not first.fast and other.name == FAST
    assert Encoder(tok).fast is not first.fast  # one encoder kept: the last one built
    _assert_same(other.fast, _reference(edited), TRICKY)


def test_no_reference_process_where_it_cannot_help(sample_tok, monkeypatch):
    assert start_reference(sample_tok, eos_token=None, bos_token=None, workers=1) is None
    monkeypatch.setenv("PREP_ENCODER", REFERENCE)
    assert start_reference(sample_tok, eos_token=None, bos_token=None, workers=2) is None


def _jsonl_jobs(sample, tmp_path) -> tuple[list[JsonlChunk], list[list[Record]]]:
    """The sample corpus plus lines of every kind a record can be, as JSONL chunks and as read_records reads
    them (in the same batches: the records of each chunk)."""
    corpus, _ = sample
    extra = [
        b"not json",
        b'{"text": ""}',
        b'{"title": "no text"}',
        b'{"text": 7}',
        b'{"text": "\\ud800 lone"}',
        b"\xff\xfe",
        b"",
        b'{"text": "a literal <|endoftext|> stays text"}',
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(corpus.read_bytes().splitlines()[:120] + extra) + b"\n")
    source = InputFile(path, "jsonl")
    chunks = read_jsonl_chunks(source, lambda n: None, size=path.stat().st_size // 4)
    jobs = [JsonlChunk(str(path), "text", 0.3, *chunk) for chunk in chunks]
    records = iter(read_records(source, "text", lambda n: None))
    batches = [list(islice(records, len(job.decode()))) for job in jobs]
    assert len(jobs) >= 4 and next(records, None) is None
    return jobs, batches


def _assert_records(got, records: list[Record]) -> None:
    """``got`` (BatchRecords) is what summarize makes of ``records``."""
    want = summarize(records, 0.3)
    assert (got.num_records, got.problems) == (want.num_records, want.problems)
    np.testing.assert_array_equal(got.is_val, want.is_val)
    assert 0 < want.is_val.sum() < len(want.is_val) or len(want.is_val) < 10


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_chunks_decode_as_read_records_and_encode_as_texts(sample, sample_tok, tmp_path, workers):
    tok = load_tokenizer(sample_tok, eos_token="<|endoftext|>")
    jobs, want = _jsonl_jobs(sample, tmp_path)
    encoder = Encoder(tok, workers=workers)
    out = list(encoder.map((i, job) for i, job in enumerate(jobs)))
    assert [i for i, _ in out] == list(range(len(jobs))) and encoder.name == FAST
    for (i, got), records in zip(out, want, strict=True):
        _assert_records(jobs[i].records, records)  # made in the worker from what it decoded
        texts = [r.text for r in records if r.text is not None]
        np.testing.assert_array_equal(got.ids, reference_encode(tok.tokenizer, texts).ids)
        np.testing.assert_array_equal(got.lengths, reference_encode(tok.tokenizer, texts).lengths)
    assert {r.problem for batch in want for r in batch} >= {None, "empty", "missing_field", "invalid"}


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_chunks_with_the_reference_engine(sample, sample_tok, tmp_path, workers, monkeypatch):
    """Forced reference, and a fall-back mid-run: either way this process decodes the chunks again."""
    jobs, want = _jsonl_jobs(sample, tmp_path)
    original = FastBPE.encode_batch
    monkeypatch.setattr(
        FastBPE,
        "encode_batch",
        lambda self, texts, added=None: EncodedBatch(*_shifted(original(self, texts, added))),
    )
    tok = load_tokenizer(sample_tok, eos_token="<|endoftext|>")
    for forced in (True, False):
        if forced:
            monkeypatch.setenv("PREP_ENGINE", REFERENCE)  # its earlier name, still read
        else:
            monkeypatch.delenv("PREP_ENGINE")
        fresh = [JsonlChunk(j.path, j.text_field, j.val_fraction, j.first_line, j.data) for j in jobs]
        notes = _Notes()
        encoder = Encoder(tok, workers=workers, notice=notes)
        out = list(encoder.map((i, job) for i, job in enumerate(fresh)))
        assert encoder.name == REFERENCE and len(notes.lines) == (0 if forced else 1)
        for (i, got), records in zip(out, want, strict=True):
            _assert_records(fresh[i].records, records)
            texts = [r.text for r in records if r.text is not None]
            np.testing.assert_array_equal(got.ids, reference_encode(tok.tokenizer, texts).ids)


def _shifted(got: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
    return got.ids + 1, got.lengths
