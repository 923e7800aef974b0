"""What the command modules share to print and to fail: one rich console, the error exit and
quiet transformers warnings. Imports no torch, so `vattn --help` stays fast."""
from __future__ import annotations

import warnings

import typer
from rich.console import Console

console = Console(width=None if Console().is_terminal else 150)


def fail(err: Exception):
    """Print a user error (what to change) and exit with status 2."""
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


def quiet_warnings():
    """Silence the transformers FutureWarnings our own calls cause (deprecated keywords and
    the like); other warnings stay."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*transformers.*")
