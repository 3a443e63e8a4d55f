"""prep/chat.py against transformers itself: the same rendering and, for benign content, the same ids as
``AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True)`` (slow: loads
transformers)."""

from __future__ import annotations

import pytest

from prep.chat import encode_chat, load_chat_template, render
from tests.prep.test_chat import ASSISTANT, BENIGN, INJECTION, folders, qwen  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def auto(folders):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    return {name: transformers.AutoTokenizer.from_pretrained(str(folder)) for name, folder in folders.items()}


@pytest.mark.parametrize("family", ["qwen", "llama3", "plain"])
def test_ids_equal_apply_chat_template(qwen, folders, auto, family):  # noqa: F811
    template = load_chat_template(folders[family])
    for messages in BENIGN:
        hf_text = auto[family].apply_chat_template(messages, tokenize=False)
        hf_ids = auto[family].apply_chat_template(messages, tokenize=True, return_dict=False)
        assert render(template, messages) == hf_text
        assert encode_chat(qwen, template, messages, ASSISTANT).input_ids.tolist() == list(hf_ids)


def test_injection_differs_from_apply_chat_template_only_in_control_tokens(qwen, folders, auto):  # noqa: F811
    template = load_chat_template(folders["qwen"])
    messages = [{"role": "user", "content": INJECTION}, {"role": "assistant", "content": "No."}]
    ours = encode_chat(qwen, template, messages, ASSISTANT).input_ids.tolist()
    assert ours != list(auto["qwen"].apply_chat_template(messages, tokenize=True, return_dict=False))
    sanitized = auto["qwen"].apply_chat_template(
        messages, tokenize=True, return_dict=False, sanitize_control_tokens=True
    )
    # transformers' opt-in sanitizing keeps the same control tokens; it cuts the text around each quoted
    # token, so its ids for the text itself may differ, while ours tokenize content as documents are
    specials = set(auto["qwen"].all_special_ids)
    assert [i for i in ours if i in specials] == [i for i in sanitized if i in specials]
