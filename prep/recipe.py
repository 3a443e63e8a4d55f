"""Mixture recipes: named sources, each with its inputs and text field and a share of the tokens or epochs.

A recipe is a TOML file (``prep pack --recipe``) or repeated ``--source NAME=INPUTS:share=X`` options;
both become one :class:`Mixture`, checked before anything is read, with messages that name the key and
the fix. The rules are in docs/mixtures.md; prep/mixture.py selects the documents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from prep.card import CARD_KEYS, check_card_info
from shared.errors import UserError
from shared.manifest import CardInfo

SHARE_TOLERANCE = 1e-6
"""How far the shares may sum from 1 (they are typed by hand: 0.3 + 0.3 + 0.4 is not exactly 1.0)."""
SOURCE_KEYS = ("inputs", "text_field", "share", "epochs")
TOP_KEYS = ("sources", "seed", "max_epochs", "total_tokens", "card")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecipeError(UserError):
    """A recipe that cannot be used as written; the message names the key and the fix."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MixSource:
    name: str
    inputs: tuple[str, ...]
    """Files, folders or globs, read in the order given."""
    text_field: str | None = None
    """None: `--text-field` (default ``text``)."""
    share: float | None = None
    """Target share of the packed ``train`` tokens, in (0, 1]."""
    epochs: float | None = None
    """Times each document is packed (a fraction takes a hashed subset), instead of a share."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Mixture:
    sources: tuple[MixSource, ...]
    seed: int = 0
    """Seeds the hash order in which a fraction of a source's documents is taken."""
    max_epochs: float = 1.0
    """No source is packed more often than this; 1: no document is repeated."""
    total_tokens: int | None = None
    """Packed ``train`` tokens to aim at; default the most that ``max_epochs`` allows."""
    where: str = "recipe"
    """The recipe file, or ``--source``, for messages."""
    card: CardInfo | None = None
    """The recipe's ``[card]`` table: the data card's metadata, beside (never instead of) the card flags."""

    def __post_init__(self) -> None:
        check_mixture(self)

    def key(self, name: str) -> str:
        """How messages name the top-level key ``name``: as the recipe spells it, or as its flag beside
        ``--source``."""
        if self.where != "--source":
            return f"`{name}`"
        return "--mix-seed" if name == "seed" else "--" + name.replace("_", "-")

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(i for s in self.sources for i in s.inputs)

    def fingerprint(self) -> dict[str, Any]:
        """What shapes the output, for `--resume`: ``mixture`` shapes the tokenized work, ``mixture_plan`` only
        the plan (a run stopped by a share its cap cannot meet resumes with the recipe fixed)."""
        return {
            "mixture": [
                {"name": s.name, "inputs": list(s.inputs), "text_field": s.text_field} for s in self.sources
            ],
            "mixture_plan": {
                "shares": [s.share for s in self.sources],
                "epochs": [s.epochs for s in self.sources],
                "seed": self.seed,
                "max_epochs": self.max_epochs,
                "total_tokens": self.total_tokens,
            },
        }


def load_recipe(path: str | Path) -> Mixture:
    """The mixture of the TOML recipe at ``path``, checked key by key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"--recipe `{path}` cannot be read ({e.strerror}); pass a TOML file.") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"--recipe `{path}` is not valid TOML ({e}); fix the file.") from e
    return mixture_from_dict(raw, where=f"recipe `{path}`")


def mixture_from_dict(raw: dict[str, Any], where: str = "recipe") -> Mixture:
    """A :class:`Mixture` from a parsed recipe; an unknown key or a value of the wrong type is named."""
    _refuse_unknown(raw, TOP_KEYS, where, "")
    tables = raw.get("sources")
    if not isinstance(tables, dict) or not tables:
        raise RecipeError(
            f"{where}: no sources; add one table per source, e.g. `[sources.news]` with"
            ' `inputs = ["data/news/*.jsonl"]` and `share = 0.3`.'
        )
    sources = []
    for name, table in tables.items():
        key = f"sources.{name}"
        if not isinstance(table, dict):
            raise RecipeError(f"{where}: `{key}` is {_kind(table)}; make it a table (`[{key}]`).")
        _refuse_unknown(table, SOURCE_KEYS, where, key + ".")
        inputs = table.get("inputs")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise RecipeError(
                f"{where}: `{key}.inputs` is {_kind(inputs)}; give a list of files, folders or globs,"
                ' e.g. `inputs = ["data/news/*.jsonl"]`.'
            )
        sources.append(
            MixSource(
                name=name,
                inputs=tuple(inputs),
                text_field=_typed(table, "text_field", str, where, key),
                share=_number(table, "share", where, key),
                epochs=_number(table, "epochs", where, key),
            )
        )
    total = _typed(raw, "total_tokens", int, where, "")
    return Mixture(
        sources=tuple(sources),
        seed=_typed(raw, "seed", int, where, "") or 0,
        max_epochs=_number(raw, "max_epochs", where, "") or 1.0,
        total_tokens=total,
        where=where,
        card=card_from_dict(raw.get("card"), where),
    )


RECIPE_CARD_NAMES = {key: f"`card.{key}`" for key in CARD_KEYS} | {
    "several": 'one string per language in a list (`language = ["en", "de"]`)'
}


def card_from_dict(table: object, where: str) -> CardInfo | None:
    """The recipe's ``[card]`` table, checked as the card flags are; None without one."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: `card` is {_kind(table)}; make it a table (`[card]`).")
    _refuse_unknown(table, CARD_KEYS, where, "card.")
    lists = {}
    for key in ("language", "source_datasets"):
        value = table.get(key, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(
                f'{where}: `card.{key}` is {_kind(value)}; give a list of strings, e.g. `{key} = ["en"]`.'
            )
        lists[key] = tuple(value)
    info = CardInfo(
        license=_typed(table, "license", str, where, "card"),
        language=lists["language"],
        source_datasets=lists["source_datasets"],
        description=_typed(table, "description", str, where, "card"),
    )
    check_card_info(info, RECIPE_CARD_NAMES, where=f"{where}: ")
    return info


def parse_source_option(spec: str) -> MixSource:
    """One ``--source NAME=INPUT[,INPUT...][:share=X|:epochs=X][:text_field=F]`` as a :class:`MixSource`.

    Options are the trailing ``:key=value`` parts, so a path or URL holding a colon (``s3://b/x``) stays
    whole.
    """
    example = "e.g. --source 'news=data/news/*.jsonl:share=0.3'"
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise RecipeError(f"--source {spec!r}: expected NAME=INPUTS[:share=X], {example}.")
    parts = rest.split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and re.fullmatch(r"[a-z_]+=.*", parts[-1]):
        key, _, value = parts.pop().partition("=")
        if key in options:
            raise RecipeError(f"--source {spec!r}: `{key}` is given twice; keep one.")
        options[key] = value
    if unknown := sorted(set(options) - {"share", "epochs", "text_field"}):
        raise RecipeError(
            f"--source {spec!r}: unknown key `{unknown[0]}`; the keys are share, epochs and text_field ({example})."
        )
    inputs = tuple(i for i in ":".join(parts).split(",") if i)
    if not inputs:
        raise RecipeError(f"--source {spec!r}: no inputs after `{name}=`; {example}.")
    return MixSource(
        name=name,
        inputs=inputs,
        text_field=options.get("text_field"),
        share=_float_option(spec, options, "share"),
        epochs=_float_option(spec, options, "epochs"),
    )


def mixture_from_options(
    specs: Sequence[str], *, seed: int | None, max_epochs: float | None, total_tokens: int | None
) -> Mixture:
    """The mixture of repeated ``--source`` options and the ``--mix-seed``/``--max-epochs``/``--total-tokens`` flags."""
    return Mixture(
        sources=tuple(parse_source_option(s) for s in specs),
        seed=0 if seed is None else seed,
        max_epochs=1.0 if max_epochs is None else max_epochs,
        total_tokens=total_tokens,
        where="--source",
    )


def _refuse_unknown(table: dict[str, Any], known: tuple[str, ...], where: str, prefix: str) -> None:
    if unknown := [k for k in table if k not in known]:
        raise RecipeError(
            f"{where}: unknown key `{prefix}{unknown[0]}`; the keys here are {', '.join(known)}."
        )


def _typed(table: dict[str, Any], key: str, kind: type, where: str, prefix: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        name = f"{prefix}.{key}" if prefix else key
        raise RecipeError(f"{where}: `{name}` is {_kind(value)}; expected {kind.__name__}.")
    return value


def _number(table: dict[str, Any], key: str, where: str, prefix: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        name = f"{prefix}.{key}" if prefix else key
        raise RecipeError(f"{where}: `{name}` is {_kind(value)}; expected a number.")
    return float(value)


def _float_option(spec: str, options: dict[str, str], key: str) -> float | None:
    if key not in options:
        return None
    try:
        return float(options[key])
    except ValueError:
        raise RecipeError(f"--source {spec!r}: `{key}={options[key]}` is not a number.") from None


def _kind(value: object) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list"}.get(
        type(value),
        "a table" if isinstance(value, dict) else "missing" if value is None else type(value).__name__,
    )


def check_mixture(m: Mixture) -> None:
    """The rules of docs/mixtures.md that need no data: each message names the key and the fix."""
    names = [s.name for s in m.sources]
    if not m.sources:
        raise RecipeError(f"{m.where}: no sources; name at least one.")
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise RecipeError(f"{m.where}: source `{dup}` is named twice; give each source its own name.")
    for s in m.sources:
        _check_source(m, s)
    if not m.max_epochs >= 1.0 or not math.isfinite(m.max_epochs):
        raise RecipeError(
            f"{m.where}: {m.key('max_epochs')} is {m.max_epochs}; it must be at least 1 (1: no repetition)."
        )
    if (
        not 0 <= m.seed < 2**64
    ):  # the manifest records counts and ids, never below zero; the hash takes 64 bits
        raise RecipeError(
            f"{m.where}: {m.key('seed')} is {m.seed}; a seed is a whole number from 0 to 2**64 - 1."
        )
    if m.total_tokens is not None and m.total_tokens < 1:
        raise RecipeError(f"{m.where}: {m.key('total_tokens')} is {m.total_tokens}; it must be at least 1.")
    shares = [s.share for s in m.sources if s.share is not None]
    with_epochs = [s.name for s in m.sources if s.epochs is not None]
    if m.total_tokens is not None and with_epochs:
        raise RecipeError(
            f"{m.where}: {m.key('total_tokens')} with source `{with_epochs[0]}` in epochs over-determines the"
            f" mixture (its epochs fix its tokens); give every source a share, or drop {m.key('total_tokens')}."
        )
    total = math.fsum(shares)
    if not with_epochs and abs(total - 1.0) > SHARE_TOLERANCE:
        scaled = ", ".join(f"{s.name}={s.share / total:.4g}" for s in m.sources if s.share is not None)
        raise RecipeError(
            f"{m.where}: the shares sum to {total:.6g}, not 1; scale them to sum to 1 (e.g. {scaled})."
        )
    if with_epochs and shares and total >= 1.0 - SHARE_TOLERANCE:
        raise RecipeError(
            f"{m.where}: the shares sum to {total:.6g} beside sources in epochs ({', '.join(with_epochs)}),"
            " which take the rest; the shares must sum to below 1."
        )


def _check_source(m: Mixture, s: MixSource) -> None:
    key = f"sources.{s.name}"
    if not NAME_PATTERN.match(s.name):
        raise RecipeError(f"{m.where}: source name {s.name!r}: use letters, digits, `_`, `.` and `-`.")
    if not s.inputs:
        raise RecipeError(f"{m.where}: `{key}.inputs` is empty; give at least one file, folder or glob.")
    if s.share is not None and s.epochs is not None:
        raise RecipeError(f"{m.where}: `{key}` gives both `share` and `epochs`; keep one.")
    if s.share is None and s.epochs is None:
        raise RecipeError(f"{m.where}: `{key}` needs `share` (of the packed tokens) or `epochs`; add one.")
    if s.share is not None and not 0.0 < s.share <= 1.0:
        percent = f" ({s.share:g}% is {s.share / 100:g})" if 1.0 < s.share <= 100.0 else ""
        raise RecipeError(f"{m.where}: `{key}.share` is {s.share}; a share is in (0, 1]{percent}.")
    if s.epochs is not None and not 0.0 < s.epochs <= m.max_epochs:
        raise RecipeError(
            f"{m.where}: `{key}.epochs` is {s.epochs}; epochs are above 0 and at most {m.key('max_epochs')}"
            f" ({m.max_epochs:g}): raise {m.key('max_epochs')} to {s.epochs:g}, or lower the epochs."
        )
    if s.text_field is not None and not s.text_field.strip():
        raise RecipeError(f"{m.where}: `{key}.text_field` is empty; name the field, or drop the key.")
