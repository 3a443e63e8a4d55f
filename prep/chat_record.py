"""What a conversation record may hold, and where each piece of its data lands in the template's rendering.

A record is a `messages` list and, optionally, a `tools` list: what transformers'
``apply_chat_template(messages, tools=tools)`` takes. Besides ``{role, content}`` with string content a
message may hold

- content blocks, ``[{"type": "text", "text": ...}, ...]`` (text only; image and audio blocks are refused);
- ``tool_calls`` (``content`` may then be null), each ``{"type"?, "id"?, "function": {"name", "arguments"}}``
  or the same without the ``function`` level, ``arguments`` an object or a JSON string;
- ``tool_call_id`` and ``name``, which templates may ignore, and other string fields, which the template
  must render (a field it ignores would be lost silently, so it is refused).

The injection proof of prep/chat.py needs to know where every piece of *data* landed: :func:`marked`
replaces each data string (content, block text, tool-call name, every key and string inside the
arguments, the string values of ``tools``) by a unique placeholder, and :func:`place` splits the marked
rendering there and puts the data back, raw or JSON-escaped (templates write arguments and tools with
``tojson``): the result must be the real rendering character for character, or the record is refused.
What is left unmarked is structure the template may test: roles, dict keys of ``tools``, ``type`` and
``id`` values; those are checked to hold no special-token text (prep/chat.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from shared.errors import UserError

TEXT_BLOCK = "text"
BLOCK_SEPARATOR = "\n"
"""Joins a message's text blocks (one per line) when the template takes only string content."""
OPTIONAL_FIELDS = ("name", "tool_call_id")
"""Message fields a template may leave out of the rendering (transformers passes them and Qwen2.5's
template ignores them)."""
TRAINING_SWITCHES = ("weight", "train", "training")
"""Per-message training switches some datasets carry (axolotl's ``weight``); the roles decide here."""
KEPT_VALUES = ("type", "id", "tool_call_id")
"""Fields whose string values stay unmarked: templates test them (``type == "function"``, an id's length)."""


class ChatError(UserError):
    """A conversation, a chat template or a tokenizer cannot be rendered into labelled ids."""


@dataclass(frozen=True, slots=True)
class ChatRecord:
    """A conversation as the template gets it."""

    messages: list[dict]
    tools: list | None = None

    @property
    def has_blocks(self) -> bool:
        return any(isinstance(m.get("content"), list) for m in self.messages)

    def joined(self) -> ChatRecord:
        """Every content-block list replaced by its texts joined with :data:`BLOCK_SEPARATOR`."""
        return replace(
            self,
            messages=[
                {**m, "content": BLOCK_SEPARATOR.join(b[TEXT_BLOCK] for b in m["content"])}
                if isinstance(m.get("content"), list)
                else m
                for m in self.messages
            ],
        )


def chat_record(value: object) -> ChatRecord:
    """The record of a `messages` list, or of ``{"messages": [...], "tools": [...]}`` (the canonical text
    of prep/readers.py); refuses what cannot be rendered, naming the message and the field."""
    tools = None
    if isinstance(value, dict):
        value, tools = value.get("messages"), value.get("tools")
    if not isinstance(value, list) or not value:
        raise ChatError(
            f"`messages` must be a non-empty list of {{role, content}} objects, got {short(value)}. Fix the record."
        )
    for i, message in enumerate(value):
        _check_message(i, message)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ChatError(f"`tools` must be a list of JSON schema objects, got {short(tools)}. Fix the record.")
    return ChatRecord(value, tools)  # an empty list stays one: `tools is not none` templates tell them apart


def _check_message(i: int, message: object) -> None:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
        raise ChatError(
            f"message {i} must be an object with a string `role` and a `content`, got {short(message)}. Fix the record."
        )
    content, calls = message["content"], message.get("tool_calls")
    if isinstance(content, list):
        _check_blocks(i, content)
    elif not isinstance(content, str) and not (content is None and calls):
        raise ChatError(
            f"message {i}: `content` must be a string or a list of text blocks (null only beside `tool_calls`),"
            f" got {short(content)}. Fix the record."
        )
    if calls is not None:
        _check_calls(i, calls)
    for key, field in message.items():
        if key in TRAINING_SWITCHES and field is not None:
            raise ChatError(
                f"message {i} has `{key}`: per-message training switches are not supported; the roles of"
                " `--train-on` choose the targets. Remove the field, or split the records by what is trained."
            )
        if key not in ("role", "content", "tool_calls") and not isinstance(field, str | None):
            raise ChatError(
                f"message {i}: field `{key}` is {short(field)}; besides `content` and `tool_calls` a message"
                " field must be a string (rendered by the template) or null. Remove it from the record."
            )


def _check_blocks(i: int, blocks: list) -> None:
    for k, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != TEXT_BLOCK:
            what = f"a `{kind}` block" if isinstance(kind, str) else f"{short(block)}"
            raise ChatError(
                f'message {i}, content block {k} is {what}; only text blocks (`{{"type": "text", "text":'
                " ...}`) can be packed. Drop the record or its non-text blocks."
            )
        extra = [key for key, v in block.items() if key not in ("type", TEXT_BLOCK) and v is not None]
        if not isinstance(block.get(TEXT_BLOCK), str) or extra:
            raise ChatError(
                f"message {i}, content block {k} must be exactly `type` and a string `text`, got {short(block)}."
                " Fix the record."
            )


def _check_calls(i: int, calls: object) -> None:
    if not isinstance(calls, list) or not calls:
        raise ChatError(f"message {i}: `tool_calls` must be a non-empty list, got {short(calls)}.")
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
            or not isinstance(function.get("arguments"), dict | str)
        ):
            raise ChatError(
                f"message {i}, tool call {k} must hold a `function` with a non-empty `name` and `arguments` (an"
                f" object or a JSON string), got {short(call)}. Fix the record."
            )


def short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# --- placeholders ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """One data string replaced by a placeholder."""

    text: str
    message: int
    """Index of the message it belongs to; -1 for `tools`."""
    what: str
    """``content`` (content or a text block), ``call`` (a tool call's name or arguments), ``field `NAME```
    (another message field), ``tools``."""
    required: bool
    """Whether the template must render it (else the data would be lost silently)."""


@dataclass(frozen=True, slots=True)
class Span:
    """Where a piece landed in the rendering (``text[start:end]``, raw or JSON-escaped)."""

    start: int
    end: int
    message: int
    what: str


@dataclass(slots=True)
class Marking:
    """A record with placeholders, the pieces they stand for and the unmarked strings."""

    marker: str
    pieces: list[Piece]
    kept: list[str]

    def mark(self, text: str, message: int, what: str, required: bool = True) -> str:
        self.pieces.append(Piece(text, message, what, required))
        return f"{self.marker}{len(self.pieces) - 1}{self.marker}"


def marked(record: ChatRecord, marker: str) -> tuple[ChatRecord, Marking]:
    """``record`` with every data string replaced by a placeholder."""
    marking = Marking(marker, [], [])
    messages = [_marked_message(i, m, marking) for i, m in enumerate(record.messages)]
    tools = None if record.tools is None else _marked_json(record.tools, -1, "tools", marking, keys=False)
    return ChatRecord(messages, tools), marking


def _marked_message(i: int, message: dict, marking: Marking) -> dict:
    out: dict = {}
    calls = message.get("tool_calls")
    for key, value in message.items():
        if key == "role" or value is None or key in KEPT_VALUES:
            out[key] = value
            if isinstance(value, str):
                marking.kept.append(value)
        elif key == "content" and isinstance(value, list):
            out[key] = [{**b, TEXT_BLOCK: marking.mark(b[TEXT_BLOCK], i, "content")} for b in value]
        elif key == "content":
            # An empty content beside tool calls stays empty: the template tests it (`if message.content`).
            out[key] = value if (calls and not value) else marking.mark(value, i, "content")
        elif key == "tool_calls":
            out[key] = [_marked_call(i, call, marking) for call in value]
        else:
            required = key not in OPTIONAL_FIELDS
            out[key] = marking.mark(value, i, f"field `{key}`", required) if value else value
    return out


def _marked_call(i: int, call: dict, marking: Marking) -> dict:
    def function(f: dict) -> dict:
        out = {}
        for key, value in f.items():
            if key == "name" or (key == "arguments" and isinstance(value, str)):
                out[key] = marking.mark(value, i, "call") if value else value
            elif key == "arguments":
                out[key] = _marked_json(value, i, "call", marking, keys=True)
            else:
                out[key] = _marked_json(value, i, "call", marking, keys=False)
        return out

    if "function" not in call:
        return function(call)
    return {
        k: function(v) if k == "function" else _marked_json(v, i, "call", marking, False, k)
        for k, v in call.items()
    }


def _marked_json(value: object, i: int, what: str, marking: Marking, keys: bool, key: str = "") -> object:
    """Strings in a JSON value marked: every non-empty string value but those of :data:`KEPT_VALUES`, and
    the keys too when ``keys`` (arguments, which templates write whole; a schema's keys are structure)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            name = marking.mark(k, i, what) if keys and k else k
            if not keys:
                marking.kept.append(k)
            out[name] = _marked_json(v, i, what, marking, keys, k)
        return out
    if isinstance(value, list):
        return [_marked_json(v, i, what, marking, keys, key) for v in value]
    if isinstance(value, str) and value:
        if key in KEPT_VALUES and not keys:
            marking.kept.append(value)
            return value
        return marking.mark(value, i, what)
    return value


def place(text: str, marked_text: str, marking: Marking) -> tuple[list[Span] | None, str]:
    """Spans of every piece in ``text``, if splitting ``marked_text`` at the placeholders and putting each
    piece back gives ``text`` exactly; else ``(None, why)``.

    A piece goes back as it is, JSON-escaped (the template wrote it with ``tojson``), stripped (Llama 3's
    ``content | trim``) or both: at each placeholder the form that the rendering holds there, followed by
    the template text up to the next placeholder. Whichever form matched, the template text between the
    pieces is the placeholder rendering's own, so a special token in it came from the template.
    """
    m = re.escape(marking.marker)
    parts = re.split(f"{m}(\\d+){m}", marked_text)
    if not text.startswith(parts[0]):
        return None, "changed"
    pos, spans = len(parts[0]), []
    for index, after in zip(parts[1::2], parts[2::2], strict=True):
        piece = marking.pieces[int(index)]
        form = next(
            (
                f
                for f in _forms(piece.text)
                if text.startswith(f, pos) and text.startswith(after, pos + len(f))
            ),
            None,
        )
        if form is None:
            return None, "changed"
        spans.append(Span(pos, pos + len(form), piece.message, piece.what))
        pos += len(form) + len(after)
    if pos != len(text):
        return None, "changed"
    landed = {int(k) for k in parts[1::2]}
    lost = next((p for k, p in enumerate(marking.pieces) if p.required and k not in landed), None)
    if lost is not None:
        where = "`tools`" if lost.message < 0 else f"message {lost.message}'s {lost.what}"
        return None, f"leaves out {where} ({short(lost.text)})"
    return spans, ""


def _forms(text: str) -> Iterator[str]:
    """The piece as it is, JSON-escaped, stripped, both: lazily, as nearly every piece lands as it is."""
    yield text
    escaped = json.dumps(text, ensure_ascii=False)[1:-1]
    yield escaped
    yield text.strip()
    yield escaped.strip()
