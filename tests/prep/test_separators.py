"""The EOS and BOS `prep pack` places are tokens that document text can never produce.

A separator that text can produce (an ordinary token such as ``.``, or a non-special added token such as
Qwen's ``<tool_call>``) would appear inside documents, and the one-EOS-per-document rule, which
`prep verify` checks, could not hold: such a pack is refused before anything is read.
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer
from typer.testing import CliRunner

from prep.cli import app
from prep.tokenizer import TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(sample, tmp_path_factory):
    """The sample tokenizer, plus variants with a non-special added token and a special merged token."""
    _, folder = sample
    base = folder / "tokenizer.json"
    root = tmp_path_factory.mktemp("separators")
    added = Tokenizer.from_file(str(base))
    added.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    added.save(str(root / "added.json"))
    merged = Tokenizer.from_file(str(base))
    word = max((t for t in merged.get_vocab(with_added_tokens=False) if t.isalpha()), key=len)
    merged.add_special_tokens([word])  # special, yet the BPE makes the same token from the word's text
    merged.save(str(root / "merged.json"))
    return base, root / "added.json", root / "merged.json", word


def test_ordinary_and_non_special_tokens_are_refused(tokenizers):
    base, added, _, _ = tokenizers
    with pytest.raises(TokenizerError, match=r"--eos-token '\.' \(id \d+\) is an ordinary vocabulary token"):
        load_tokenizer(base, eos_token=".")
    with pytest.raises(TokenizerError, match="--bos-token '<tool_call>' .* added token that is not special"):
        load_tokenizer(added, bos_token="<tool_call>")


def test_a_special_token_the_model_also_merges_is_refused(tokenizers):
    _, _, merged, word = tokenizers
    with pytest.raises(TokenizerError, match="also makes it from text"):
        load_tokenizer(merged, eos_token=word)


def test_special_tokens_are_accepted(tokenizers):
    """The control: the sample's own special tokens pass."""
    base, _, merged, _ = tokenizers
    tok = load_tokenizer(base, eos_token="<|endoftext|>", bos_token="<|im_start|>")
    assert tok.eos_id != tok.bos_id
    assert load_tokenizer(merged).info.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_pack_refuses_before_reading(sample, tokenizers, tmp_path):
    corpus, _ = sample
    base, *_ = tokenizers
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["pack", str(corpus), "--tokenizer", str(base), "--out", str(out), "--eos-token", "."]
    )
    assert result.exit_code == 1
    assert "cannot mark where documents end" in result.output and "Choose a special token" in result.output
    assert not out.exists()
