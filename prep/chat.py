"""Rendering a conversation with the tokenizer's chat template into ids and assistant-only labels.

The template is rendered with Jinja exactly as transformers' ``apply_chat_template`` does (a sandboxed
environment, ``trim_blocks``/``lstrip_blocks``, the same globals and ``tojson``, the tokenizer's named special
tokens as variables, no generation prompt). What differs is who may produce control tokens: transformers
tokenizes the rendered string, so a user turn holding the text ``<|im_end|>`` becomes a real turn end. Here
only the template's own text can:

    rendered   <|im_start|>user\\n[content 0]<|im_end|>\\n<|im_start|>assistant\\n[content 1]<|im_end|>\\n
    owner      tttttttttttttttttt0000000000ttttttttttttttttttttttttttttttttttttt1111111111tttttttttttt
    stretches  S----------------------------S S-------------------------------S ---------- S ----
    labels     -100 ...                                                         content 1 + <|im_end|>

1. Each piece of data (a content, a text block, a tool call, the strings of ``tools``: prep/chat_record.py)
   is replaced by a unique placeholder and the template rendered; splitting at the placeholders gives the
   template's own text, and putting the data back (as it is, JSON-escaped or stripped) must give the real
   rendering (checked for every conversation: a template that edits content, or leaves data out, is
   refused).
2. Special tokens (S) are looked for in the template's text only. Between two of them, a *stretch* of
   template text and content is tokenized as a whole with special-token text kept as text, as
   documents are. `tokenizers` tokenizes the text between special tokens independently, so when no
   content holds special-token text the ids equal transformers' by construction; when one does, only
   the stretches holding it differ.
3. A token is a target when it overlaps the content of a role in ``train_on``; the first template special
   token after such content (the turn's closing token, ``<|im_end|>``) is a target too. An assistant turn
   with tool calls is a target from the end of its header (the generation prompt) to its closing token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from prep.chat_record import ChatError, ChatRecord, Span, chat_record, marked, place, short

__all__ = ["ChatError"]

IGNORE = -100
TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens that transformers passes to every template (its `special_tokens_map`).
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LONG_CHAT_RULES = ("drop", "truncate")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A chat template and the variables transformers gives it besides the messages."""

    source: str
    """The Jinja text."""
    origin: str
    """Where it came from, for messages: a file path."""
    named_tokens: dict[str, str]
    """``bos_token``, ``eos_token`` ... as in ``tokenizer_config.json``."""


@dataclass(frozen=True, slots=True)
class ChatIds:
    """One conversation as ids and unshifted labels (``-100`` where nothing is learnt).

    ``turn_ends`` are the indices one past each target span (after the closing token), the only places a
    long conversation may be cut.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    turn_ends: tuple[int, ...]

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def load_chat_template(tokenizer_file: str | Path, template_file: str | Path | None = None) -> ChatTemplate:
    """The template of ``--chat-template`` if given, else ``chat_template.jinja`` or ``tokenizer_config.json``
    beside the tokenizer (transformers prefers the ``.jinja`` file when both exist)."""
    tokenizer_file = Path(tokenizer_file)
    folder = tokenizer_file if tokenizer_file.is_dir() else tokenizer_file.parent
    config = _read_config(folder / "tokenizer_config.json")
    named = {k: v for k in _NAMED_TOKENS if (v := _token_text(config.get(k))) is not None}
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise ChatError(f"--chat-template `{path}` does not exist; pass a Jinja chat template file.")
        return _checked(ChatTemplate(path.read_text(encoding="utf-8"), str(path), named))
    if (folder / TEMPLATE_FILE).is_file():
        path = folder / TEMPLATE_FILE
        return _checked(ChatTemplate(path.read_text(encoding="utf-8"), str(path), named))
    source = config.get("chat_template")
    if isinstance(source, list):  # several named templates: transformers uses the one named "default"
        source = next(
            (t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if not isinstance(source, str):
        raise ChatError(
            f"`{folder}` has no chat template (no {TEMPLATE_FILE}, no `chat_template` in tokenizer_config.json)."
            " Pass one with `--chat-template FILE`."
        )
    return _checked(ChatTemplate(source, str(folder / "tokenizer_config.json"), named))


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatError(f"`{path}` is not valid JSON ({e}). Fix or remove it.") from e
    return config if isinstance(config, dict) else {}


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):  # older configs store an AddedToken dict
        value = value.get("content")
    return value if isinstance(value, str) else None


def _checked(template: ChatTemplate) -> ChatTemplate:
    try:
        _compile(template.source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(
            f"chat template `{template.origin}` does not parse (line {e.lineno}: {e.message}). Fix it or pass"
            " another with `--chat-template FILE`."
        ) from e
    return template


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    """The environment of transformers' ``_cached_compile_jinja_template``, less its ``{% generation %}``
    tracker (labels come from content ownership here, so ``generation`` blocks are rendered as plain text)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # noqa: ANN001, ANN202
        # Jinja's own tojson escapes HTML characters; transformers replaces it, and so must we.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def check_tokenizer_for_chat(tokenizer: Tokenizer) -> None:
    """Refuse tokenizers for which tokenizing a stretch alone could differ from tokenizing it in place.

    A SentencePiece-style prefix space (Metaspace, ``add_prefix_space``, a ``Prepend`` normalizer) is added
    to the first piece of a string only, and special tokens that strip or need word boundaries look at
    their neighbours: both would break the stretch argument of the module docstring.
    """
    spec = json.loads(tokenizer.to_str())
    parts = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    if '"Metaspace"' in parts or '"Prepend"' in parts or '"add_prefix_space": true' in parts:
        raise ChatError(
            "this tokenizer adds a prefix space (SentencePiece style); chat packing supports byte-level BPE"
            " tokenizers without one (Qwen, Llama 3, GPT-2 style). Pack the conversations as text with"
            " `--format text`, or use such a tokenizer."
        )
    for token in spec.get("added_tokens", []):
        if token.get("special") and (token.get("lstrip") or token.get("rstrip") or token.get("single_word")):
            raise ChatError(
                f"special token {token.get('content')!r} strips whitespace or needs word boundaries; chat"
                " packing supports tokenizers whose special tokens do neither. Use `--format text`."
            )


def encode_chat(
    tokenizer: Tokenizer, template: ChatTemplate, record: object, train_on: frozenset[str]
) -> ChatIds:
    """Ids and labels of one conversation (a `messages` list, or ``{"messages", "tools"}``);
    ``tokenizer`` must keep special-token text as text (``encode_special_tokens``, as
    :func:`prep.tokenizer.open_tokenizer` sets it)."""
    conversation = chat_record(record)
    text, spans, kept = render_with_spans(template, conversation)
    named = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    _check_kept(named, kept)
    specials = _template_specials(named, text, spans)
    targets = _targets(template, conversation, text, spans, specials, train_on)
    ids: list[int] = []
    labels: list[int] = []
    turn_ends: list[int] = []
    pending = [e for _, e in targets]  # target ends still waiting for their closing token
    cut = 0
    for start, end, token_id in [*specials, (len(text), len(text), None)]:
        if start > cut:
            encoding = tokenizer.encode(text[cut:start], add_special_tokens=False)
            for tid, (a, b) in zip(encoding.ids, encoding.offsets, strict=True):
                ids.append(tid)
                hit = any(s < cut + b and cut + a < e for s, e in targets)
                labels.append(tid if hit else IGNORE)
        if token_id is None:
            break
        closes = [e for e in pending if e <= start]
        pending = [e for e in pending if e > start]
        ids.append(token_id)
        labels.append(token_id if closes else IGNORE)
        if closes:
            turn_ends.append(len(ids))
        cut = end
    if not turn_ends and any(lab != IGNORE for lab in labels):
        turn_ends.append(len(ids))
    return ChatIds(np.array(ids, dtype=np.int32), np.array(labels, dtype=np.int32), tuple(turn_ends))


def _targets(
    template: ChatTemplate,
    conversation: ChatRecord,
    text: str,
    spans: list[Span],
    specials: list[tuple[int, int, int]],
    train_on: frozenset[str],
) -> list[tuple[int, int]]:
    """``(start, end)`` of the text to learn: the content of each message of a trained role, and for an
    assistant message with tool calls everything from the end of its turn's header (the generation
    prompt) to its closing token: its content, the tool-call markup and JSON."""
    targets = []
    for i, message in enumerate(conversation.messages):
        if message["role"] not in train_on:
            continue
        own = [s for s in spans if s.message == i and s.what in ("content", "call")]
        if message.get("tool_calls"):
            targets.append(_call_turn(template, conversation, i, text, spans, own, specials))
        else:
            targets += [(s.start, s.end) for s in own]
    return sorted(targets)


def _call_turn(
    template: ChatTemplate,
    conversation: ChatRecord,
    i: int,
    text: str,
    spans: list[Span],
    own: list[Span],
    specials: list[tuple[int, int, int]],
) -> tuple[int, int]:
    """The target of assistant message ``i`` with tool calls (see :func:`_targets`): from the end of the
    generation prompt found in the template text just before the message's first data, to the first
    template special token after its last data (which must come before the next message's data)."""
    header = generation_prompt(template)
    first, last = min(s.start for s in own), max(s.end for s in own)
    before = max((s.end for s in spans if s.end <= first), default=0)
    at = text.rfind(header, before, first) if header else -1
    close = next((a for a, _, _ in specials if a >= last), None)
    after = min((s.start for s in spans if s.message > i and s.start >= last), default=len(text))
    if at < 0 or close is None or close > after:
        raise ChatError(
            f"message {i} ({conversation.messages[i]['role']} with tool calls): chat template"
            f" `{template.origin}` does not open the turn with its generation prompt {header!r} and close"
            " it with a special token, so the tool call's target cannot be told from the template's text."
            " Pass a template that does with `--chat-template FILE`, or leave the role out of `--train-on`."
        )
    return at + len(header), close


def generation_prompt(template: ChatTemplate) -> str:
    """What the template adds for ``add_generation_prompt`` after a user turn ('' if not a pure suffix)."""
    return _generation_prompt(template.source, tuple(sorted(template.named_tokens.items())), template.origin)


@lru_cache(maxsize=8)
def _generation_prompt(source: str, named: tuple[tuple[str, str], ...], origin: str) -> str:
    template = ChatTemplate(source, origin, dict(named))
    one = [{"role": "user", "content": "x"}]
    plain = render(template, one)
    prompted = render(template, one, add_generation_prompt=True)
    return prompted[len(plain) :] if prompted.startswith(plain) else ""


def _check_kept(specials: dict[str, int], kept: list[str]) -> None:
    """Roles, schema keys, ``type`` and ids stay template text (templates test them): none may hold
    special-token text, which would become a control token."""
    for value in set(kept):
        if hit := next((t for t in specials if t in value), None):
            raise ChatError(
                f"{short(value)} (a role, a `tools` key, a `type` or an id) holds the special token"
                f" {hit!r}; it would be written as a control token. Fix the record."
            )


def render(
    template: ChatTemplate,
    messages: list[dict],
    tools: list | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The rendered conversation, as transformers' ``apply_chat_template(messages, tools=tools,
    tokenize=False)`` gives it."""
    try:
        return _compile(template.source).render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **template.named_tokens,
        )
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError) as e:
        raise ChatError(
            f"chat template `{template.origin}` refused the conversation: {e}. Fix the record or the template."
        ) from e


def render_with_spans(template: ChatTemplate, conversation: ChatRecord) -> tuple[str, list[Span], list[str]]:
    """The rendering, the :class:`Span` of every place a piece of data landed in it, and the strings left
    unmarked (prep/chat_record.py).

    Content blocks are given to the template as they are when it renders their texts in place (a
    template that loops over blocks); when it cannot (it fails on a list, prints the list, or leaves the
    texts out, as Qwen2.5's does) each message's texts are joined with a newline first. Templates that
    trim content (Llama 3's ``content | trim``) or write it with ``tojson`` are met by placing the data
    stripped or JSON-escaped, accepted only if the rendering is the very same text.
    """
    candidates = [conversation, conversation.joined()] if conversation.has_blocks else [conversation]
    why = "changed"
    for k, candidate in enumerate(candidates):
        try:
            text = render(template, candidate.messages, candidate.tools)
        except ChatError:
            if k + 1 < len(candidates):
                continue
            raise
        spans, kept, why = _data_spans(template, candidate, text)
        if spans is not None and not (k + 1 < len(candidates) and _prints_blocks(text, spans)):
            return text, spans, kept
    if why != "changed":
        raise ChatError(
            f"chat template `{template.origin}` {why}: that data would be lost silently. Remove it from the"
            " record, or pass a template that renders it with `--chat-template FILE`."
        )
    raise ChatError(
        f"chat template `{template.origin}` changes message content as it renders it (it splits, tests,"
        " edits or escapes it, or a tool call's data), so the data's tokens cannot be told from the template's. Pass a template that"
        " inserts content as is with `--chat-template FILE`, or pack the records with `--format text`."
    )


def _prints_blocks(text: str, spans: list[Span]) -> bool:
    """Whether the template text shows a content block's structure (it printed the list, not its texts)."""
    cut, pieces = 0, []
    for span in sorted(spans, key=lambda s: s.start):
        pieces.append(text[cut : span.start])
        cut = max(cut, span.end)
    template_text = "".join([*pieces, text[cut:]])
    return "'type': 'text'" in template_text or '"type": "text"' in template_text


def _data_spans(
    template: ChatTemplate, conversation: ChatRecord, text: str
) -> tuple[list[Span] | None, list[str], str]:
    """Spans of the data in ``text`` if rendering with placeholders and putting the data back gives
    ``text`` exactly; else None and why."""
    record, marking = marked(conversation, _free_marker(text))
    try:
        marked_text = render(template, record.messages, record.tools)
    except ChatError:
        return None, [], "changed"
    spans, why = place(text, marked_text, marking)
    return spans, marking.kept, why


def _free_marker(text: str) -> str:
    """A private-use marker that occurs nowhere in the rendering (and so in no data it holds)."""
    for code in range(0xE000, 0xF8FF):
        marker = chr(code)
        if marker not in text:
            return marker
    raise ChatError("every private-use character occurs in this conversation; it cannot be rendered.")


def _template_specials(specials: dict[str, int], text: str, spans: list[Span]) -> list[tuple[int, int, int]]:
    """``(start, end, id)`` of the ``specials`` (text -> id) in the template's own text, never inside data.

    Matched leftmost-longest, as `tokenizers` matches added tokens."""
    if not specials:
        return []
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    found: list[tuple[int, int, int]] = []
    cut = 0
    for start, end in [*sorted((s.start, s.end) for s in spans), (len(text), len(text))]:
        found += [
            (cut + m.start(), cut + m.end(), specials[m.group()]) for m in pattern.finditer(text[cut:start])
        ]
        cut = max(cut, end)
    return found


def fit_chat(chat: ChatIds, max_tokens: int, rule: str) -> ChatIds | None:
    """A conversation that fits ``max_tokens``, or None when it must be dropped.

    ``drop`` drops any conversation longer than a row. ``truncate`` keeps the longest prefix that ends just
    after a trained turn's closing token, so no turn is ever cut in the middle; with no such prefix the
    conversation is dropped. The caller counts both outcomes.
    """
    if rule not in LONG_CHAT_RULES:
        raise ChatError(f"--long-chats {rule!r} is not one of {', '.join(LONG_CHAT_RULES)}.")
    if len(chat.input_ids) <= max_tokens:
        return chat
    if rule == "drop":
        return None
    cut = max((end for end in chat.turn_ends if end <= max_tokens), default=0)
    if cut == 0:
        return None
    return ChatIds(chat.input_ids[:cut], chat.labels[:cut], tuple(e for e in chat.turn_ends if e <= cut))
