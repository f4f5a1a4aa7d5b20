"""The Typer app behind `zoo`. Each command parses, calls one library function, prints.

Heavy imports (torch, onnx) happen inside commands so that `zoo --help` is instant; `zoo list`
and `zoo info` read the catalogue's facts and file headers without importing torch or timm
(see :func:`cli.common.zoo_module`). Errors a user can cause become one line on stderr and exit
code 1 (bad flag values: exit 2); any other exception is a bug in zoo, also one line (exit 1)
naming the command and where to report it, with the traceback when ``ZOO_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable

import click
import typer

from .commands import COMMANDS
from .common import WORKFLOW, zoo_module

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


# Exits and flag errors (typer.BadParameter: exit 2) that commands raise on purpose, from click
# or from the copy of click that newer Typers carry.
_CLI_EXITS = (
    typer.Exit,
    typer.Abort,
    click.exceptions.Exit,
    click.exceptions.Abort,
    click.ClickException,
    next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
)
DEBUG_ENV = "ZOO_DEBUG"  # set to 1: an unexpected error prints its traceback
BUG_REPORTS = "zoo's issue tracker"


class UserError(Exception):
    """An error the user caused, reported as one line."""


def user_errors(fn: Callable, name: str | None = None) -> Callable:
    """Turn errors a user can cause into one line on stderr and exit code 1, and any other
    exception into one line naming the command ``name`` (see :func:`internal_error`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        # zoo.WeightsFileError is a ValueError and zoo.fileio's WriteError (a full disk, a
        # read-only folder) an OSError: not importing them keeps `zoo run` free of torch.
        except (UserError, ValueError, OSError) as err:
            typer.echo(f"error: {_first_line(err)}", err=True)
            raise typer.Exit(1) from None
        except _CLI_EXITS:
            raise  # exits and flag errors (exit 2) that the command chose
        except Exception as err:  # a bug: the last line of defence
            internal_error(name or fn.__name__.removesuffix("_command"), err)
            raise typer.Exit(1) from None

    return wrapper


def internal_error(name: str, err: Exception) -> None:
    """One line for an exception no command expected; the traceback too with ``ZOO_DEBUG=1``."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__)
    hint = "" if debug else f" (rerun with {DEBUG_ENV}=1 for the traceback)"
    typer.echo(
        f"internal error in `zoo {name}`: {type(err).__name__}: {_first_line(err)} -- a bug in zoo: "
        f"please report it to {BUG_REPORTS} with the command line{hint}",
        err=True,
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


LIST_EXAMPLE = "Example: zoo list 'slim_resnet*'"


def list_command(pattern: str = typer.Argument(None, help="fnmatch filter, e.g. 'slim_vit*'")) -> None:
    """Print the catalogue: name, family, axes, parameter count, shipped weights."""
    from rich.console import Console
    from rich.table import Table

    catalogue = zoo_module("catalogue")
    caption = (
        "rank: families built with low_rank=True. pretrained: the shipped weights (--pretrained NAME) as NAME.TAG, "
        "timm's tag for the image families."
    )
    table = Table(
        "name",
        "family",
        "member axes",
        "params",
        "params (low-rank)",
        "pretrained",
        box=None,
        caption=caption,
        caption_justify="left",
    )
    for name in catalogue.names(pattern):
        facts = catalogue.MODELS[name]
        shipped = catalogue.PRETRAINED.get(name)
        axes = f"{', '.join(facts['axes_low_rank'] or facts['axes'])} per {facts['groups'][1]}"
        table.add_row(
            name,
            facts["family"],
            axes,
            f"{facts['params']:,}",
            f"{facts['params_low_rank']:,}" if facts["params_low_rank"] else "-",
            f"{name}.{shipped['tag']}" if shipped else "-",
        )
    Console(width=max(Console().width, 130)).print(table)  # never cut names on a narrow or piped output


for name, function, options in sorted(
    [("list", list_command, {"epilog": LIST_EXAMPLE}), *COMMANDS], key=lambda c: WORKFLOW.index(c[0])
):
    app.command(name, **options)(user_errors(function, name))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
