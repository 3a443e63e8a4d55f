"""The code points on which the fast encoder's Unicode data may differ from `tokenizers`', found exhaustively.

The fast encoder (:mod:`prep.fast_bpe`) reproduces `tokenizers` with other code: Python's ``unicodedata``
normalises, and tiktoken's Rust ``regex`` splits, where `tokenizers` uses its own normalisation tables and
Oniguruma. Each library carries its own Unicode version, so a code point assigned in one version and not
the other (a combining mark added in Unicode 14, say) is normalised or split differently. Both steps depend
on the text only through per-code-point data:

- NFC through each code point's canonical decomposition, combining class and composition exclusion;
- the split pattern through each code point's membership in the pattern's character classes (``\\p{L}``,
  ``\\s``, the case-insensitive literals of ``(?i:'s|...)`` ...).

:func:`divergent_code_points` asks both implementations about every Unicode scalar value: the pattern's
classes one at a time, NFC and NFD of each code point alone, its combining class against a mark of every
combining class. A code point on which any answer differs is divergent, and so, by closure, is every code
point whose decomposition holds one, and the second half of every composition that yields one (NFC could
produce a divergent code point from safe ones). A text with no divergent code point is normalised and split
identically by both, so the fast encoder encodes it; any other text goes to `tokenizers` (see
:meth:`prep.fast_bpe.FastBPE.encode_batch`). The answer depends on the library versions and the pattern, not
on the vocabulary; it is cached beside the fast encoder's tables, with a digest checked on every load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np

DIVERGENCE_VERSION = 1

_ATOM = re.compile(
    r"\\[pP]\{[^}]*\}|\\[pP][A-Za-z]|\\.|\[:\^?[a-z]+:\]|\(\?[A-Za-z-]*[:)]|\(\?<?[=!]|\(\?[<P]?'?[A-Za-z_]|.",
    re.DOTALL,
)
_CLASS_ESCAPES = set("sSdDwW")
_LITERAL_ESCAPES = set("rntfve0\\|()[]{}?*+.^$-/' #&~")


class UnsupportedPattern(Exception):
    """The split pattern uses a construct whose per-code-point behaviour we cannot probe."""


def pattern_atoms(pattern: str) -> list[str]:
    """The single-character classes a split pattern's meaning depends on, as stand-alone regexes.

    Everything else the pattern may hold is syntax with one meaning in both libraries (alternation,
    quantifiers, groups, look-ahead, ASCII literals, classes built from these atoms). Constructs that
    depend on more than one code point's class (word boundaries, grapheme clusters, back references,
    POSIX classes) raise :class:`UnsupportedPattern`, and the caller keeps using `tokenizers`.
    """
    atoms: list[str] = []
    ignore_case = False
    literals: set[str] = set()
    for token in _ATOM.findall(pattern):
        if token.startswith(("\\p", "\\P")):
            atoms.append("\\p" + token[2:])  # \P{X} is the complement of \p{X}: the same per-code-point data
        elif token.startswith("\\"):
            if token[1] in _CLASS_ESCAPES:
                atoms.append("\\" + token[1].lower())  # likewise \S, \D, \W
            elif token[1] in ("x", "u"):
                raise UnsupportedPattern(f"escape {token!r} in the split pattern")
            elif token[1] not in _LITERAL_ESCAPES:
                raise UnsupportedPattern(f"{token!r} in the split pattern")
            elif not token[1].isalnum():  # an escaped symbol; \r, \n, \t ... are controls, not letters
                literals.add(token[1])
        elif token.startswith("[:"):
            raise UnsupportedPattern(f"POSIX class {token!r} in the split pattern")
        elif token.startswith("(?"):
            flags = token[2:].rstrip(":)")
            if token in ("(?:", "(?=", "(?!", "(?<=", "(?<!"):
                continue
            if not set(flags) <= set("i-"):
                raise UnsupportedPattern(f"group {token!r} in the split pattern")
            ignore_case = ignore_case or "i" in flags.split("-")[0]
        elif token == ".":
            atoms.append(".")
        elif not token.isascii() or token.isalpha():
            literals.add(token)
    if ignore_case:  # case folding is per-code-point data too
        atoms += [f"(?i:{re.escape(c)})" for c in sorted(literals) if c.lower() != c.upper()]
    atoms += [re.escape(c) for c in sorted(literals) if not c.isascii()]
    return list(dict.fromkeys(atoms))


def all_scalars() -> np.ndarray:
    """Every Unicode scalar value but NUL (the probes' marker), as uint32."""
    points = np.arange(1, 0x110000, dtype=np.uint32)
    return points[(points < 0xD800) | (points > 0xDFFF)]


def _text(points: np.ndarray) -> str:
    return points.astype("<u4").tobytes().decode("utf-32-le")


def _points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _class_divergence(atom: str, scalars: np.ndarray, text: str) -> np.ndarray:
    """Code points that ``atom`` matches in exactly one of tiktoken's engine and `tokenizers`' Oniguruma."""
    import tiktoken
    from tokenizers import Regex, normalizers

    # tiktoken encodes only what the pattern matches: with single-byte ranks, the matches come back as bytes.
    probe = tiktoken.Encoding(
        "class-probe", pat_str=atom, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
    )
    matched = bytes(probe._core_bpe.encode_ordinary(text)).decode("utf-8")
    in_fast = np.zeros(0x110000, dtype=bool)
    in_fast[_points(matched)] = True
    # Oniguruma replaces each one-character match with NUL, which no probed code point is.
    marked = _points(normalizers.Replace(Regex(atom), "\x00").normalize_str(text))
    if len(marked) != len(scalars):
        raise UnsupportedPattern(f"class {atom!r} matched more than one character at a time")
    in_reference = np.zeros(0x110000, dtype=bool)
    in_reference[scalars[marked == 0]] = True
    return np.flatnonzero(in_fast != in_reference).astype(np.uint32)


def _differing(normalizer, form: str, chars: list[str], probes: list[str]) -> set[int]:
    """The code points of ``chars`` whose probe `tokenizers`' ``normalizer`` and ``unicodedata`` turn apart."""
    joined = "\x00".join(probes)  # NUL: a starter that composes with nothing
    theirs, ours = normalizer.normalize_str(joined), unicodedata.normalize(form, joined)
    if theirs == ours:
        return set()
    theirs_split, ours_split = theirs.split("\x00"), ours.split("\x00")
    if len(theirs_split) != len(probes) or len(ours_split) != len(probes):
        raise AssertionError("a normalizer added or removed a NUL")
    return {ord(c) for c, a, b in zip(chars, theirs_split, ours_split, strict=True) if a != b}


# A base that composes with no mark, and marks of the lowest (1) and highest (240) combining class.
_BASE, _LOW, _HIGH = "!", "\u0334", "\u0345"


def _normalization_divergence(scalars: np.ndarray) -> set[int]:
    """Code points whose NFC/NFD data (decomposition, exclusion, combining class) differ between the two."""
    from tokenizers import normalizers

    nfc = normalizers.NFC()
    chars = [chr(c) for c in scalars.tolist()]
    found = _differing(nfc, "NFC", chars, chars) | _differing(normalizers.NFD(), "NFD", chars, chars)
    # A starter here that has a combining class in `tokenizers` moves between the two marks there.
    starters = [c for c in chars if unicodedata.combining(c) == 0]
    found |= _differing(nfc, "NFC", starters, [f"{_BASE}{_HIGH}{c}{_LOW}" for c in starters])
    # A mark here that is a starter there stays in place where it moves here, past one of the two marks.
    marks = [c for c in chars if unicodedata.combining(c)]
    found |= _differing(nfc, "NFC", marks, [f"{_BASE}{c}{_LOW}" for c in marks])
    found |= _differing(nfc, "NFC", marks, [f"{_BASE}{_HIGH}{c}" for c in marks])
    # A mark of another class there sorts otherwise against a mark of some class: one known to both of
    # each class is the ladder (a wrong rung only makes more code points divergent, never fewer).
    ladder: dict[int, str] = {}
    for c in marks:
        if ord(c) not in found and unicodedata.decomposition(c) == "":
            ladder.setdefault(unicodedata.combining(c), c)
    for rung in ladder.values():
        found |= _differing(nfc, "NFC", marks, [f"{_BASE}{rung}{c}" for c in marks])
        found |= _differing(nfc, "NFC", marks, [f"{_BASE}{c}{rung}" for c in marks])
    return found


def _close(divergent: set[int], scalars: np.ndarray) -> set[int]:
    """Add what can normalise into a divergent code point: holders of one in their NFD, and composition halves."""
    chars = [chr(c) for c in scalars.tolist()]
    parts = unicodedata.normalize("NFD", "\x00".join(chars)).split("\x00")
    decomposed = {ord(c): d for c, d in zip(chars, parts, strict=True) if d != c}
    result = set(divergent)
    while True:
        before = len(result)
        for c in list(result):
            mapping = unicodedata.decomposition(chr(c))
            parts = mapping.split()
            if len(parts) == 2 and not mapping.startswith("<"):  # a composition: its second half triggers it
                result.add(int(parts[1], 16))
        result |= {c for c, d in decomposed.items() if any(ord(x) in result for x in d)}
        if len(result) == before:
            return result


def class_divergence(pattern: str) -> np.ndarray:
    """Code points on which one of the split pattern's classes differs between the two regex engines."""
    scalars = all_scalars()
    text = _text(scalars)
    found: set[int] = set()
    for atom in pattern_atoms(pattern):
        found |= set(_class_divergence(atom, scalars, text).tolist())
    return np.array(sorted(_close(found, scalars)), dtype=np.uint32)


def normalization_divergence() -> np.ndarray:
    """Code points whose NFC may differ between ``unicodedata`` and `tokenizers`, closed under composition."""
    scalars = all_scalars()
    return np.array(sorted(_close(_normalization_divergence(scalars), scalars)), dtype=np.uint32)


def divergent_code_points(pattern: str, nfc: bool, folder: Path | None) -> np.ndarray:
    """Sorted code points (uint32) on which the fast encoder may differ from `tokenizers`, for this pattern.

    Each part is cached in ``folder`` under a name made from the libraries' versions (and the pattern),
    with a sha256 over that name and the code points: a damaged or edited file is computed again, never used.
    """
    parts = [_cached(folder, "classes", {"pattern": pattern}, lambda: class_divergence(pattern))]
    if nfc:
        parts.append(_cached(folder, "nfc", {}, normalization_divergence))
    return np.union1d(parts[0], parts[-1]).astype(np.uint32)


def _key(kind: str, facts: dict) -> str:
    import tiktoken
    import tokenizers

    facts = {
        **facts,
        "kind": kind,
        "version": DIVERGENCE_VERSION,
        "tokenizers": tokenizers.__version__,
        "tiktoken": tiktoken.__version__,
        "unicodedata": unicodedata.unidata_version,
        "python": sys.version,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode("utf-8")).hexdigest()


def _cached(folder: Path | None, kind: str, facts: dict, compute) -> np.ndarray:
    key = _key(kind, facts)
    path = folder / f"divergent-{kind}-{key}.npy" if folder is not None else None
    if path is not None and path.is_file():
        with contextlib.suppress(Exception):
            stored = np.load(path, allow_pickle=False)
            if stored.dtype == np.uint64 and len(stored) >= 4:
                digest, points = stored[:4], stored[4:].astype(np.uint32)
                if np.array_equal(digest, _digest(key, points)):
                    return points
    points = compute()
    if path is not None:
        _save(path, np.concatenate([_digest(key, points), points.astype(np.uint64)]))
    return points


def _digest(key: str, points: np.ndarray) -> np.ndarray:
    h = hashlib.sha256(key.encode("ascii") + points.astype("<u4").tobytes()).digest()
    return np.frombuffer(h, dtype="<u8").astype(np.uint64)


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def guard(points: np.ndarray) -> re.Pattern | None:
    """A regex that finds any of ``points`` in a text (``None`` when there are none)."""
    if len(points) == 0:
        return None
    ranges: list[str] = []
    values = points.tolist()
    start = prev = values[0]
    for c in values[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        ranges.append(
            re.escape(chr(start)) if start == prev else f"{re.escape(chr(start))}-{re.escape(chr(prev))}"
        )
        if c is not None:
            start = prev = c
    return re.compile(f"[{''.join(ranges)}]")
