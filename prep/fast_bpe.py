"""An exact, faster encoder for byte-level BPE tokenizers: `tiktoken` rebuilt from a `tokenizer.json`.

`tokenizers` stays the source of truth. This module reads the same ``tokenizer.json`` and accepts only
what it can reproduce exactly: an NFC (or absent) normaliser, a byte-level BPE model without dropout,
byte fallback or affixes, and a pre-tokenizer that is either ``ByteLevel(use_regex=True)`` (the GPT-2
pattern) or ``Sequence[Split(regex, Isolated), ByteLevel(use_regex=False)]`` (Qwen2, Llama 3). Anything
else raises :class:`Unsupported`, and the caller keeps using `tokenizers`.

How the pieces map:

- vocab strings are byte-level unicode (GPT-2's printable stand-ins for bytes); we map them back to the
  raw bytes that `tiktoken` merges.
- `tiktoken` merges the adjacent pair whose concatenation has the lowest *rank*; `tokenizers` merges
  the pair with the lowest *merge index*. We therefore give each merged token the rank
  ``256 + index of the merge that makes it`` (single bytes get 0..255), refuse vocabularies where one
  token is made by two merges, and translate ranks back to the tokenizer's ids with a lookup table.
- added tokens are matched in the raw text first, leftmost-longest, as `tokenizers` does. With
  ``encode_special_tokens`` a *special* match is dropped and its text stays ordinary text; a
  *non-special* match (Qwen's ``<tool_call>``, id 151657) becomes its id. The text between matches is
  NFC-normalised piece by piece, exactly as `tokenizers` normalises each split.

`tiktoken` skips merging when a whole pre-token is itself in the vocabulary; `tokenizers` only does
that with ``ignore_merges``. The tables are built only if that shortcut changes nothing: every token a
merge makes must come back whole from `tokenizers`' own merges of its characters (checked for every
vocabulary entry, :func:`_check_tokens_reachable`).

What is proven, and what is not: normalisation and the split agree on every Unicode scalar value, and a
text holding a code point on which they may not is left to `tokenizers` (:mod:`prep.divergence`). The
merge loops themselves differ in one way no table check can settle: tiktoken merges the adjacent pair
whose *concatenation* has the lowest rank, `tokenizers` only pairs that form a merge. They agree on every
vocabulary entry, on every probe of the exhaustive test and on every document of the real corpora; the
per-batch sample (:func:`prep.encoder.first_mismatch`) stays as the alarm for that remaining assumption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.divergence import UnsupportedPattern, divergent_code_points, guard

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The pattern `tokenizers`' ``ByteLevel(use_regex=True)`` splits with (GPT-2's)."""


WHITESPACE_TAIL = r"|\s+(?!\S)|\s+"
"""How GPT-2, Qwen2 and Llama 3 split patterns end: the only alternative with a look-around comes last but one."""


def fast_pattern(pattern: str) -> str:
    """``pattern`` with every alternative before :data:`WHITESPACE_TAIL` in one group: the same splits, faster.

    tiktoken's regex engine (`fancy_regex`) runs a pattern with a look-around in a backtracking VM and
    hands each part without one to the `regex` crate. Written flat, the leading alternatives are tried one
    after the other, one DFA search each, at every piece; grouped, they are one search. Alternation is
    associative under leftmost-first matching and nothing follows it, so every split is unchanged (the
    tests compare both forms, and the per-batch check compares ids with `tokenizers`). Returned as they are: patterns that end otherwise, and those where grouping could
    change a meaning: an escaped last ``|``, verbose mode (comments), or a bare flag group such as
    ``(?-u)`` whose scope would end at the new group instead of covering the tail.
    """
    head = pattern[: -len(WHITESPACE_TAIL)]
    if not pattern.endswith(WHITESPACE_TAIL) or not head:
        return pattern
    backslashes = len(head) - len(head.rstrip("\\"))
    if backslashes % 2 or "#" in head or re.search(r"\(\?[a-zA-Z-]*(x|\))", head):
        return pattern
    return f"(?:{head}){WHITESPACE_TAIL}"


LONG_WHITESPACE = re.compile(r"(?<!\s)\s{65536}")
"""A whitespace run the fast encoder leaves to `tokenizers` (the look-behind keeps the search linear)."""


class Unsupported(Exception):
    """The tokenizer is not one this encoder reproduces exactly; the reason is the message."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _check_normalizer(spec: dict | None) -> bool:
    """True when NFC applies, False when nothing does; anything else is unsupported."""
    if spec is None:
        return False
    if spec.get("type") == "NFC":
        return True
    if spec.get("type") == "Sequence" and [n.get("type") for n in spec.get("normalizers", [])] == ["NFC"]:
        return True
    raise Unsupported(f"normalizer {spec.get('type')!r} (only NFC or none)")


def _pattern_of(spec: dict | None) -> str:
    """The split regex of a supported byte-level pre-tokenizer."""
    if spec is None:
        raise Unsupported("no pre-tokenizer (byte-level BPE needs ByteLevel)")

    def byte_level(p: dict, use_regex: bool) -> None:
        if p.get("type") != "ByteLevel":
            raise Unsupported(f"pre-tokenizer {p.get('type')!r} where ByteLevel was expected")
        if p.get("add_prefix_space"):
            raise Unsupported("ByteLevel(add_prefix_space=True)")
        if bool(p.get("use_regex", True)) != use_regex:
            raise Unsupported(f"ByteLevel(use_regex={p.get('use_regex')}) in this position")

    if spec.get("type") == "ByteLevel":
        byte_level(spec, use_regex=True)
        return GPT2_PATTERN
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    if len(parts) != 2 or parts[0].get("type") != "Split":
        raise Unsupported(f"pre-tokenizer {spec.get('type')!r} (only ByteLevel, or Split then ByteLevel)")
    split = parts[0]
    if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in split.get("pattern", {}):
        raise Unsupported("Split pre-tokenizer other than an isolated, non-inverted regex")
    byte_level(parts[1], use_regex=False)
    return split["pattern"]["Regex"]


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # Older tokenizer.json files store "a b" strings; newer ones store [a, b] pairs.
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _ranks(model: dict) -> tuple[dict[bytes, int], np.ndarray]:
    """tiktoken ranks (merge priority) and the table from rank back to the tokenizer's id."""
    if model.get("type") != "BPE":
        raise Unsupported(f"model {model.get('type')!r} (only BPE)")
    if model.get("dropout") or model.get("byte_fallback") or model.get("unk_token") is not None:
        raise Unsupported("BPE with dropout, byte fallback or an unknown token")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise Unsupported("BPE with a subword prefix or word suffix")
    byte_chars = bytes_to_unicode()
    vocab: dict[str, int] = model["vocab"]
    strange = set("".join(vocab)) - set(byte_chars.values())
    if strange:
        raise Unsupported(f"vocab characters {''.join(sorted(strange)[:8])!r} are not byte-level unicode")
    # Byte-level text -> code points 0..255 -> latin-1 bytes: the raw bytes a token stands for.
    to_latin1 = str.maketrans({c: chr(b) for b, c in byte_chars.items()})

    missing = [b for b in range(256) if byte_chars[b] not in vocab]
    if missing:
        raise Unsupported(f"bytes {missing[:8]} have no token")
    merged = [a + b for a, b in _merge_pairs(model.get("merges", []))]
    merged_ids = [vocab.get(m) for m in merged]
    if None in merged_ids:
        raise Unsupported(f"merge result {merged[merged_ids.index(None)]!r} is missing from the vocab")
    keys = [bytes([b]) for b in range(256)] + [m.translate(to_latin1).encode("latin-1") for m in merged]
    ranks = dict(zip(keys, range(len(keys)), strict=True))
    if len(ranks) != len(keys):
        raise Unsupported("a token is made by more than one merge")
    rank_to_id = [vocab[byte_chars[b]] for b in range(256)] + merged_ids
    if not model.get("ignore_merges"):
        _check_tokens_reachable(vocab, model.get("merges", []), merged)
    return ranks, np.array(rank_to_id, dtype=np.int32)


def _check_tokens_reachable(vocab: dict[str, int], merges: list, merged: list[str]) -> None:
    """Refuse a vocabulary where some merged token is not what `tokenizers`' merges make of its characters:
    for such a pre-token tiktoken's whole-piece shortcut would give one id and `tokenizers` several."""
    from tokenizers.models import BPE

    bpe = BPE(vocab=vocab, merges=_merge_pairs(merges))
    for token in merged:
        got = bpe.tokenize(token)
        if len(got) != 1 or got[0].value != token:
            raise Unsupported(
                f"token {token!r} is not what its own merges make ({[t.value for t in got]}); tiktoken's"
                " whole-piece shortcut would differ"
            )


def _added_token_splitter(added: list[dict]) -> tuple[re.Pattern | None, dict[str, int]]:
    """A leftmost-longest matcher over every added token, and the ids of the non-special ones."""
    keep: dict[str, int] = {}
    for t in added:
        if t.get("special"):
            continue  # with encode_special_tokens a special match is dropped: its text stays text
        if t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise Unsupported(f"added token {t['content']!r} with normalized/lstrip/rstrip/single_word")
        keep[t["content"]] = t["id"]
    if not keep:
        return None, keep
    # Longest first: at the leftmost match position, the longest literal wins, as in aho-corasick.
    contents = sorted({t["content"] for t in added}, key=lambda s: (-len(s), s))
    return re.compile("|".join(re.escape(c) for c in contents)), keep


CACHE_VERSION = 1


CACHE_ENV = "PREP_FAST_BPE_CACHE"
CACHE_OFF = ("", "0", "off", "false", "no")


def cache_dir() -> Path | None:
    """Where derived rank tables are kept (one file per tokenizer.json, by its sha256), or None when off.

    ``PREP_FAST_BPE_CACHE`` names the folder, or turns the cache off (``off``); by default it is
    ``$XDG_CACHE_HOME/packed-shards`` (``~/.cache/packed-shards``). Deriving the tables of a large
    vocabulary is Python work before the first batch; reading them back is a small part of it.
    """
    folder = os.environ.get(CACHE_ENV)
    if folder is not None and folder.strip().lower() in CACHE_OFF:
        return None
    if not folder:
        home = os.path.expanduser("~")
        base = os.environ.get("XDG_CACHE_HOME") or (None if home == "~" else os.path.join(home, ".cache"))
        if base is None:  # no home folder to put it in: rather no cache than one in the working folder
            return None
        folder = os.path.join(base, "packed-shards")
    return Path(folder) / f"fast-bpe-v{CACHE_VERSION}"


Tables = tuple[bool, str, dict[bytes, int], np.ndarray, list[dict]]
"""What :class:`FastBPE` derives from a tokenizer.json: (nfc, split pattern, ranks, rank -> id, added tokens)."""


def derive_tables(path: Path, sha256: str | None = None) -> Tables:
    """(nfc, split pattern, ranks, rank -> id, added tokens) of ``path``, from the cache when possible.

    ``sha256``: the file's, if the caller has it (then a cache hit does not read the file at all). The
    cache holds derived data only, with a sha256 over every table and the tokenizer's sha256: a damaged,
    edited, stale-format or unwritable cache costs the derivation again, never a wrong table.
    """
    raw = None
    if sha256 is None:
        raw = path.read_bytes()
        sha256 = hashlib.sha256(raw).hexdigest()
    folder = cache_dir()
    cached = folder / f"{sha256}.npz" if folder else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:  # zipfile checks each member's CRC-32
                meta, blob = z["meta"].tobytes(), z["blob"].tobytes()
                offsets, rank_to_id = z["offsets"], z["rank_to_id"]
                digest = z["digest"].tobytes().decode("ascii")
            if digest != _tables_digest(sha256, meta, blob, offsets, rank_to_id):
                raise ValueError("the cached tables do not match their digest")
            info = json.loads(meta.decode("utf-8"))
            ends = offsets.tolist()
            ranks = {blob[ends[i] : ends[i + 1]]: i for i in range(len(ends) - 1)}
            return info["nfc"], info["pattern"], ranks, rank_to_id, info["added"]
        except Exception:  # any damage at all: derive the tables again, and overwrite them
            pass
    spec = json.loads(raw if raw is not None else path.read_bytes())
    nfc = _check_normalizer(spec.get("normalizer"))
    pattern = _pattern_of(spec.get("pre_tokenizer"))
    ranks, rank_to_id = _ranks(spec.get("model", {}))
    added = spec.get("added_tokens", [])
    if cached is not None:
        _write_cache(cached, sha256, nfc, pattern, ranks, rank_to_id, added)
    return nfc, pattern, ranks, rank_to_id, added


def _tables_digest(sha256: str, meta: bytes, blob: bytes, offsets: np.ndarray, rank_to_id: np.ndarray) -> str:
    """sha256 over the tokenizer's sha256 and every table, as stored: what a cache file must carry to be used."""
    h = hashlib.sha256(sha256.encode("ascii"))
    for part in (meta, blob, np.ascontiguousarray(offsets, "<i8"), np.ascontiguousarray(rank_to_id, "<i4")):
        h.update(len(part).to_bytes(8, "little") if isinstance(part, bytes) else str(part.shape).encode())
        h.update(part if isinstance(part, bytes) else part.tobytes())
    return h.hexdigest()


def _write_cache(
    cached: Path,
    sha256: str,
    nfc: bool,
    pattern: str,
    ranks: dict[bytes, int],
    rank_to_id: np.ndarray,
    added: list,
) -> None:
    meta = json.dumps({"nfc": nfc, "pattern": pattern, "added": added}).encode("utf-8")
    keys = list(ranks)  # in rank order: rank i is keys[i]
    blob = b"".join(keys)
    offsets = np.cumsum([0] + [len(k) for k in keys]).astype(np.int64)
    digest = _tables_digest(sha256, meta, blob, offsets, rank_to_id)
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.frombuffer(meta, dtype=np.uint8),
                blob=np.frombuffer(blob, dtype=np.uint8),
                offsets=offsets,
                rank_to_id=rank_to_id,
                digest=np.frombuffer(digest.encode("ascii"), dtype=np.uint8),
            )
        os.replace(tmp, cached)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """Every document of a batch as one flat int32 array plus its per-document lengths."""

    ids: np.ndarray
    """int32, all documents back to back."""
    lengths: np.ndarray
    """int64, tokens of each document, in batch order."""


class FastBPE:
    """Encodes text as the `tokenizers` model it was built from would, with `tiktoken` doing the BPE."""

    def __init__(self, tokenizer_json: str | Path, sha256: str | None = None) -> None:
        """``sha256``: the file's, if the caller has it (see :func:`derive_tables`)."""
        import tiktoken  # optional dependency (the `fast` extra): a missing module means "unsupported"

        self.path = Path(tokenizer_json)
        self.nfc, pattern, ranks, self.rank_to_id, added = derive_tables(self.path, sha256)
        try:
            divergent = divergent_code_points(pattern, self.nfc, cache_dir())
        except UnsupportedPattern as e:
            raise Unsupported(str(e)) from e
        self.divergent = guard(divergent)
        self._ascii_safe = not (divergent < 128).any()
        self._reference = None
        self.num_referred = 0
        self.splitter, self.added_ids = _added_token_splitter(added)
        self._first_chars = "".join(sorted({c[0] for c in self.added_ids}))
        # Added ids ride through the rank space on ranks past the last merge, so one table lookup maps all.
        self._added_rank = {i: len(self.rank_to_id) + k for k, i in enumerate(self.added_ids.values())}
        self.rank_to_id = np.concatenate(
            [self.rank_to_id, np.array(list(self.added_ids.values()), dtype=np.int32)]
        )
        try:
            self.encoding = tiktoken.Encoding(
                "fast-bpe", pat_str=fast_pattern(pattern), mergeable_ranks=ranks, special_tokens={}
            )
        except Exception as e:  # the Rust regex engine rejects some patterns `tokenizers` accepts
            raise Unsupported(f"tiktoken cannot compile the split pattern ({e})") from e

    def provable(self, text: str) -> bool:
        """Whether this encoder encodes ``text`` as `tokenizers` does, by construction.

        It does unless the text holds a code point on which the two libraries' Unicode data differ
        (:mod:`prep.divergence`), or a whitespace run long enough to exhaust the backtracking stack of
        tiktoken's regex engine (a panic there, around a million characters).
        """
        if LONG_WHITESPACE.search(text) is not None:
            return False
        if self.divergent is None or (self._ascii_safe and text.isascii()):
            return True
        return self.divergent.search(text) is None

    def reference(self):
        """The `tokenizers` model this encoder reproduces, loaded on first use (for what it cannot prove)."""
        if self._reference is None:
            from prep.tokenizer import open_tokenizer

            self._reference = open_tokenizer(self.path)
        return self._reference

    def _pieces(self, text: str) -> list[str | int]:
        """Text split at non-special added tokens: strings to encode, ints already ids."""
        if self.splitter is None or not any(c in text for c in self._first_chars):
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in self.splitter.finditer(text):
            token_id = self.added_ids.get(m.group())
            if token_id is None:
                continue  # a special token's text: part of the ordinary text around it
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(token_id)
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _normalize(self, piece: str) -> str:
        if self.nfc and not unicodedata.is_normalized("NFC", piece):
            return unicodedata.normalize("NFC", piece)
        return piece

    def has_added_token(self, text: str) -> bool:
        """Whether ``text`` holds a non-special added token (the riskiest case: always worth a check)."""
        return any(isinstance(piece, int) for piece in self._pieces(text))

    def encode_batch(self, texts: list[str], added_docs: list[int] | None = None) -> EncodedBatch:
        """Ids of each text alone (no BOS/EOS), identical to `tokenizers` with encode_special_tokens.

        A text that is not :meth:`provable`, or that tiktoken's regex engine gives up on (a run of about
        a million spaces exhausts its backtracking stack), is encoded by `tokenizers` itself, and counted
        in :attr:`num_referred`. ``added_docs``, when given, receives the index of every text holding a
        non-special added token (what :meth:`has_added_token` says, without splitting the text twice).
        """
        lengths = np.empty(len(texts), dtype=np.int64)
        ranks: list[int] = []
        referred: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            before = len(ranks)
            has_added = self._encode_into(text, ranks) if self.provable(text) else None
            if has_added is None:
                referred[i] = self.reference().encode(text, add_special_tokens=False).ids
                lengths[i] = len(referred[i])
                continue
            if added_docs is not None and has_added:
                added_docs.append(i)
            lengths[i] = len(ranks) - before
        ids = self.rank_to_id[np.array(ranks, dtype=np.int64)] if ranks else np.zeros(0, dtype=np.int32)
        if referred:
            ids = _splice(ids, lengths, referred)
            self.num_referred += len(referred)
        return EncodedBatch(ids=ids, lengths=lengths)

    def _encode_into(self, text: str, ranks: list[int]) -> bool | None:
        """Append the ranks of ``text`` to ``ranks``; whether it holds a non-special added token, or ``None``
        (and nothing appended) when tiktoken's regex engine gives up on it."""
        before = len(ranks)
        pieces = self._pieces(text)
        try:
            for piece in pieces:
                if isinstance(piece, int):
                    ranks.append(self._added_rank[piece])
                else:
                    ranks.extend(self.encoding._core_bpe.encode_ordinary(self._normalize(piece)))
        except BaseException as e:  # a Rust panic reaches Python as pyo3's PanicException, a BaseException
            if type(e).__name__ != "PanicException":
                raise
            del ranks[before:]
            return None
        return any(isinstance(piece, int) for piece in pieces)


def _splice(ids: np.ndarray, lengths: np.ndarray, referred: dict[int, list[int]]) -> np.ndarray:
    """``ids`` (the fast encoder's, without the referred texts) with each referred text's ids in its place."""
    pieces, pos = [], 0
    for i, length in enumerate(lengths.tolist()):
        if i in referred:
            pieces.append(np.asarray(referred[i], dtype=np.int32))
        else:
            pieces.append(ids[pos : pos + length])
            pos += length
    return np.concatenate(pieces) if pieces else ids
