"""`prep pack` in a batch job: progress as plain lines, a summary that keeps every column, the separator named."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import prep.cli as cli
from prep.cli import app
from shared.manifest import Manifest

pytestmark = pytest.mark.slow  # each test packs the sample through the CLI (over 2 s on a loaded 2-core box)


def _pack(sample, out, *extra):
    corpus, tok = sample
    return CliRunner().invoke(app, ["pack", str(corpus), "--tokenizer", str(tok), "--out", str(out), *extra])


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(sample, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.PlainProgress, "interval", 0.0)  # a line at every step
    result = _pack(sample, tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("tokenize: ")]
    assert len(lines) >= 2, result.output
    assert "% (" in lines[0] and "MiB of" in lines[0] and "docs," in lines[0] and "tokens" in lines[0]
    assert "MiB/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].endswith("s") and "done in" in lines[-1]
    assert "\r" not in result.output and "\x1b[" not in result.output  # no bar redrawn in place


def test_summary_keeps_every_column_and_names_the_separator(sample, tmp_path):
    out = tmp_path / ("a-folder-name-long-enough-to-push-the-summary-past-eighty-columns-" * 2) / "packed"
    result = _pack(sample, out)
    assert result.exit_code == 0, result.output
    assert f"packed into {out}" in result.output  # the whole path on one line, not cut at 80 columns
    assert "separator: EOS <|endoftext|> (id " in result.output and "no BOS" in result.output
    assert "warning:" not in result.output


def test_a_chat_turn_token_as_eos_is_warned_about(sample, tmp_path):
    result = _pack(sample, tmp_path / "out", "--eos-token", "<|im_end|>", "--bos-token", "<|im_start|>")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "separator: EOS <|im_end|> (id " in flat and "BOS <|im_start|> (id " in flat
    assert "warning: the EOS `<|im_end|>` is a chat template's end-of-turn token" in flat
    assert "--eos-token '<|endoftext|>'" in flat


def test_pack_and_write_lines_count_the_split_not_the_reading(sample, tmp_path):
    """After tokenizing, each split's lines give its own documents and tokens (as the manifest records them),
    not the totals read, which a log reader would take for the split's."""
    out = tmp_path / "out"
    result = _pack(sample, out, "--val-fraction", "0.1")
    assert result.exit_code == 0, result.output
    m = Manifest.load(out)
    assert m.splits["val"].num_docs < m.documents.packed  # else the check below could not fail
    for name, split in m.splits.items():
        counts = f"{split.num_docs:,} docs, {split.num_tokens:,} tokens"
        for phase in ("pack", "write"):
            line = next(x for x in result.output.splitlines() if x.startswith(f"{phase} {name}: "))
            assert counts in line, line


def test_verify_report_lines_are_whole_in_a_log(sample, tmp_path):
    """`prep verify` in a batch job: each line of its report stays one line (a log has no width to wrap to)."""
    out = tmp_path / "out"
    assert _pack(sample, out).exit_code == 0
    said = CliRunner().invoke(app, ["verify", str(out)])
    assert said.exit_code == 0, said.output
    [line] = [x for x in said.output.splitlines() if x.startswith("all checks hold: ")]
    assert line.rstrip().endswith("documents"), line  # the last check named, on the same line
