"""What the `prep` and `train` command lines share: their consoles, app settings and error exit."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
"""Errors, progress and notices."""
out = Console()
"""Results: what a user may pipe elsewhere."""


def typer_app(name: str, help: str) -> typer.Typer:
    """A Typer app that shows help when called bare and prints our errors, not Python tracebacks."""
    return typer.Typer(
        name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )


def fail(error: Exception, code: int = 1) -> typer.Exit:
    """Print ``error`` in red (as text: brackets in paths or values are not rich markup) and exit."""
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
