"""`train check`: passes the trainer's varlen path on packed data, rejects the naive packed forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.pipeline import PackConfig, pack
from train.check import CheckConfig, run_check
from train.cli import app


def _invoke(*args: str):
    return CliRunner().invoke(app, ["check", *map(str, args)])


def test_check_passes_on_the_packed_sample(packed_sample):
    result = run_check(CheckConfig(data=packed_sample, attn="sdpa", device="cpu", num_rows=3))
    assert result.passed, result
    assert result.mode == "varlen" and result.attn == "sdpa" and result.dtype == "float64"
    assert len(result.rows) == 3
    assert all(r.num_segments >= 2 for r in result.rows)
    assert result.max_abs_diff < 1e-4


def test_check_rejects_the_negative_control(packed_sample):
    result = run_check(
        CheckConfig(data=packed_sample, attn="sdpa", device="cpu", num_rows=3, negative_control=True)
    )
    assert not result.passed
    assert all(not r.passed for r in result.rows)
    assert min(r.max_abs_diff for r in result.rows) > 100 * max(r.tolerance for r in result.rows)


def test_cli_reports_pass_and_catches_the_leak(packed_sample):
    ok = _invoke(packed_sample, "--attn", "sdpa", "--device", "cpu", "--num-rows", "2")
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output
    leaky = _invoke(
        packed_sample, "--attn", "sdpa", "--device", "cpu", "--num-rows", "2", "--negative-control"
    )
    assert leaky.exit_code == 1
    assert "FAIL" in leaky.output and "negative control" in leaky.output


def test_cli_refuses_a_changed_shard(packed_sample, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in Path(packed_sample).iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _invoke(copy, "--attn", "sdpa", "--device", "cpu")
    assert result.exit_code == 1
    assert "checksum mismatch" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_check_fails_when_no_row_holds_two_documents(sample, tmp_path):
    """Rows of one truncated document each cannot leak: the check says so instead of passing."""
    corpus, tokenizer = sample
    long_docs = tmp_path / "long.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:40]]
    long_docs.write_text(
        "".join(json.dumps({"text": " ".join(texts[i : i + 10])}) + "\n" for i in (0, 10, 20))
    )
    out = tmp_path / "one-doc-rows"
    pack(
        PackConfig(
            inputs=(str(long_docs),), tokenizer=str(tokenizer), out=out, seq_len=32, long_docs="truncate"
        )
    )
    result = _invoke(out, "--attn", "sdpa", "--device", "cpu")
    assert result.exit_code == 1
    assert "not exercised" in result.output


@pytest.mark.corpus
@pytest.mark.slow
def test_check_on_reuters_packed_at_1024(reuters, qwen_tokenizer, tmp_path):
    """The real corpus and the Qwen2.5 vocabulary (151,665 ids), a slice of it to stay fast."""
    head = tmp_path / "reuters-head.jsonl"
    with open(reuters, encoding="utf-8") as f:
        head.write_text("".join(next(f) for _ in range(300)), encoding="utf-8")
    out = tmp_path / "reuters-1024"
    pack(PackConfig(inputs=(str(head),), tokenizer=str(qwen_tokenizer), out=out, seq_len=1024))
    ok = run_check(CheckConfig(data=out, attn="sdpa", device="cpu", num_rows=2))
    assert ok.passed, ok
    assert all(r.num_tokens > 512 and r.num_segments >= 2 for r in ok.rows)
    leaky = run_check(CheckConfig(data=out, attn="sdpa", device="cpu", num_rows=1, negative_control=True))
    assert not leaky.passed


def test_check_errors_print_brackets_as_text(tmp_path):
    """A path like `runs/[a]` is text, not rich markup (markup would swallow `[a]`)."""
    missing = tmp_path / "[a]" / "packed"
    result = _invoke(missing, "--model", "tiny-qwen2")
    assert result.exit_code == 1
    assert "[a]" in " ".join(result.output.split())


def test_unknown_device_is_an_error_line_not_a_traceback(packed_sample):
    result = _invoke(packed_sample, "--device", "gpu")
    assert result.exit_code == 1
    assert "--device 'gpu' is unknown; use auto, cpu, cuda, cuda:N or mps." in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


CHATML = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"


def test_check_passes_on_chat_shards(sample, tmp_path):
    """Conversations packed with masked labels go through the same varlen path, isolated as documents are."""
    corpus, tokenizer = sample
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    source = tmp_path / "chat.jsonl"
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question {k}?"},
                    {"role": "assistant", "content": f"Answer {k}."},
                ]
            }
        )
        for k in range(60)
    ]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "packed"
    m = pack(
        PackConfig(
            inputs=(str(source),), tokenizer=str(tokenizer), out=out, seq_len=128, chat_template=str(template)
        )
    )
    assert (
        m.options.format == "chat" and 0 < m.splits["train"].num_target_tokens < m.splits["train"].num_tokens
    )
    result = run_check(CheckConfig(data=out, attn="sdpa", device="cpu", num_rows=2))
    assert result.passed, result
    assert all(r.num_segments >= 2 for r in result.rows)
