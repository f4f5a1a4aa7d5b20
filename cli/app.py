"""The Typer app behind `zoo`. Each command parses, calls one library function, prints.

Heavy imports (torch, onnx) happen inside commands so that `zoo --help` is instant. Errors a
user can cause become one line on stderr and exit code 1 (bad flag values: exit 2).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import typer

app = typer.Typer(
    name="zoo",
    help="Train a family of nested networks in one run, slice any member out, export it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def root(version: bool = typer.Option(False, "--version", help="Print zoo's version and exit.", is_eager=True)) -> None:
    """Train a family of nested networks in one run, slice any member out, export it."""
    if version:
        from importlib.metadata import version as package_version

        typer.echo(package_version("zoo"))
        raise typer.Exit()


class UserError(Exception):
    """An error the user caused, reported as one line."""


def user_errors(fn: Callable) -> Callable:
    """Turn errors a user can cause into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        # zoo.WeightsFileError is a ValueError: not importing it keeps `zoo run` free of torch.
        except (UserError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
            typer.echo(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def command(name: str | None = None, **kwargs) -> Callable[[Callable], Callable]:
    """Register a command whose user errors are reported as one line."""
    return lambda fn: app.command(name, **kwargs)(user_errors(fn))


@command("list")
def list_command(pattern: str = typer.Argument(None, help="fnmatch filter, e.g. 'slim_vit*'")) -> None:
    """Print the catalogue: name, family, axes, parameter count."""
    from rich.console import Console
    from rich.table import Table

    import torch

    import zoo

    table = Table("name", "family", "axes", "params (dense)", "params (low-rank)", box=None)
    for name in zoo.list_models(pattern):
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            dense, low = zoo.create_model(name), zoo.create_model(name, low_rank=True)
        table.add_row(name, zoo.family_of(name), "width, rank (low_rank=True)", f"{_count(dense):,}", f"{_count(low):,}")
    Console().print(table)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    from . import commands  # noqa: F401  (registers the commands defined in other modules)

    app()


if __name__ == "__main__":
    sys.exit(main())
