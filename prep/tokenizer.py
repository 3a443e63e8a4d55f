"""Loading a Hugging Face tokenizer and turning document text into ids, never into control tokens.

`tokenizers` matches added tokens in raw text before anything else, so a document that quotes
``<|endoftext|>`` would otherwise gain a real separator in the middle. We set ``encode_special_tokens``
so that text of *special* added tokens (EOS, ``<|im_start|>`` ...) is tokenized as ordinary text; the only
special ids in a packed row are the BOS/EOS that `prep pack` itself places.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from shared.errors import UserError
from shared.fileio import sha256_file
from shared.manifest import TokenizerInfo

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(UserError):
    """The tokenizer path or the requested EOS/BOS token cannot be used."""


def resolve_tokenizer_file(path: str | Path) -> Path:
    """Accept a ``tokenizer.json`` or a model folder that holds one."""
    path = Path(path)
    if path.is_dir():
        candidate = path / TOKENIZER_FILE
        if not candidate.is_file():
            raise TokenizerError(
                f"`{path}` is a folder without a {TOKENIZER_FILE}. Pass the tokenizer.json itself, or a model"
                " folder saved with `save_pretrained` (a fast tokenizer)."
            )
        return candidate
    if not path.exists():
        raise TokenizerError(f"tokenizer `{path}` does not exist; pass a tokenizer.json or a model folder.")
    return path


def _default_eos(tokenizer_file: Path) -> str | None:
    """The EOS named by a ``tokenizer_config.json`` beside the tokenizer, if there is one."""
    config = tokenizer_file.with_name("tokenizer_config.json")
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(eos, dict):  # older configs store an AddedToken dict
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


_COMMON_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class LoadedTokenizer:
    """A tokenizer's :class:`TokenizerInfo`, and its `tokenizers` model, loaded on first use if not given.

    ``prep pack`` resolves the info in another process (see :class:`prep.encoder.ReferenceProcess`) and
    then seldom needs the model in its own, which is slow to load for a large vocabulary.
    """

    __slots__ = ("info", "_tokenizer")

    def __init__(self, info: TokenizerInfo, tokenizer: Tokenizer | None = None) -> None:
        self.info = info
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = open_tokenizer(resolve_tokenizer_file(self.info.path))
        return self._tokenizer

    @property
    def eos_id(self) -> int:
        return self.info.eos_id

    @property
    def bos_id(self) -> int | None:
        return self.info.bos_id

    def special_ids(self) -> np.ndarray:
        """Ids of the special added tokens: none of them may come out of document text."""
        ids = [i for i, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special]
        return np.array(sorted(ids), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text alone: no BOS/EOS added, special-token text kept as text."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(
    path: str | Path, *, eos_token: str | None = None, bos_token: str | None = None
) -> LoadedTokenizer:
    file = resolve_tokenizer_file(path)
    tokenizer = open_tokenizer(file)

    if eos_token is None:
        eos_token = _default_eos(file) or next(
            (t for t in _COMMON_EOS if tokenizer.token_to_id(t) is not None), None
        )
        if eos_token is None:
            raise TokenizerError(f"cannot tell the EOS token of `{file}`; pass it with `--eos-token`.")
    eos_id = _token_id(tokenizer, eos_token, "--eos-token", file)
    bos_id = None if bos_token is None else _token_id(tokenizer, bos_token, "--bos-token", file)
    for flag, token, token_id in (("--eos-token", eos_token, eos_id), ("--bos-token", bos_token, bos_id)):
        if token_id is not None:
            _check_text_cannot_produce(tokenizer, file, flag, token, token_id)
    if bos_id is not None and bos_id == eos_id:
        raise TokenizerError(
            f"--bos-token {bos_token!r} is the EOS token (id {eos_id}); a separator used as BOS would break the"
            " one-EOS-per-document rule. Choose a distinct BOS, or leave `--bos-token` out."
        )
    info = TokenizerInfo(
        path=str(path),
        sha256=sha256_file(file),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eos_token=eos_token,
        eos_id=eos_id,
        bos_token=bos_token,
        bos_id=bos_id,
    )
    return LoadedTokenizer(tokenizer=tokenizer, info=info)


def open_tokenizer(file: Path) -> Tokenizer:
    """The `tokenizers` model of ``file``, set to keep special-token text as text, without padding or truncation."""
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for every parse failure
        raise TokenizerError(
            f"`{file}` is not a Hugging Face tokenizer.json ({e}). Pass the tokenizer.json of a fast tokenizer."
        ) from e
    tokenizer.encode_special_tokens = True
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _token_id(tokenizer: Tokenizer, token: str, flag: str, file: Path) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        specials = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        raise TokenizerError(
            f"{flag} {token!r} is not a token of `{file}`. Its special tokens are: {', '.join(specials[:12]) or 'none'}."
        )
    return token_id


def _check_text_cannot_produce(
    tokenizer: Tokenizer, file: Path, flag: str, token: str, token_id: int
) -> None:
    """Refuse an EOS/BOS that document text can produce: then it would not mark where documents end.

    Text never produces a *special* added token (its text is tokenized as text, see the module docstring),
    unless the model's own vocabulary can produce the same id: a BPE vocabulary through its base alphabet,
    byte fallback or merges, any other model through any of its entries.
    """
    added = tokenizer.get_added_tokens_decoder().get(token_id)
    specials = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
    fix = f"Choose a special token: {', '.join(specials[:12]) or 'the tokenizer has none; add one'}."
    if added is None or not added.special:
        kind = "an added token that is not special" if added is not None else "an ordinary vocabulary token"
        raise TokenizerError(
            f"{flag} {token!r} (id {token_id}) is {kind} of `{file}`: document text produces it, so it"
            f" cannot mark where documents end. {fix}"
        )
    if tokenizer.model.token_to_id(token) is None:
        return
    if _model_can_produce(file, token):
        raise TokenizerError(
            f"{flag} {token!r} (id {token_id}) is special, but the model's vocabulary of `{file}` also makes"
            f" it from text (a merge or a base token), so it cannot mark where documents end. {fix}"
        )


def _model_can_produce(file: Path, token: str) -> bool:
    """Whether the model of ``file`` can output ``token`` for some text (rare: read the file again)."""
    model = json.loads(file.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return True
    if len(token) == 1 or token == model.get("unk_token") or re.fullmatch(r"<0x[0-9A-F]{2}>", token):
        return True
    merges = model.get("merges", [])
    return any((m.replace(" ", "", 1) if isinstance(m, str) else "".join(m)) == token for m in merges)
