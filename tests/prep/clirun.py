"""Running `prep` as a user does (through Typer's test runner) and reading what it said, for the CLI tests."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from prep.cli import app


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def failed_with(result, *parts: str, flat: bool = False) -> None:
    """Exit 1 with an `error:` line, no traceback, and every part in the output.

    ``flat``: compare with runs of whitespace made one space, on both sides (the console wraps long
    messages at its width, so a part may cross a line break).
    """
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    output = " ".join(result.output.split()) if flat else result.output
    for part in parts:
        part = " ".join(part.split()) if flat else part
        assert part in output, f"{part!r} not in {output!r}"
