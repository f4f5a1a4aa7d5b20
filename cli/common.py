"""What the command modules share: how a command is marked for the app, the weights file a
command reads, and zoo's light modules.

Command modules mark their functions with :func:`command`; :mod:`cli.app` imports them all
(:mod:`cli.commands`) and registers each with its error handling, so no command module
imports the app.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Callable

import typer

COMMANDS: list[tuple[str, Callable, dict]] = []  # (name, function, Typer options), in definition order
WORKFLOW = (
    "train",
    "eval",
    "profile",
    "search",
    "slice",
    "export",
    "run",
    "bench",
    "info",
    "list",
    "convert",
)  # `zoo --help`'s order


def _flags_show_no_type() -> None:
    """Typer's help writes ``<bool>`` beside an on/off flag, which takes no value (``--pretrained
    true`` is an error): show no type there, as click does."""
    from typer.core import TyperOption

    typed = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag else typed(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()


def command(name: str, **options) -> Callable[[Callable], Callable]:
    """Mark ``fn`` as the command ``zoo NAME`` (registered by :mod:`cli.app`)."""

    def mark(fn: Callable) -> Callable:
        COMMANDS.append((name, fn, options))
        return fn

    return mark


def option(name: str, kind: object, default: object, help: str, flag: str | None = None, **typer_options):
    """One command-line option, declared once: the keyword ``name`` a command receives, its type,
    default and help; the flag is ``--name`` with dashes unless ``flag`` says otherwise."""
    flag = flag or f"--{name.replace('_', '-')}"
    info = typer.Option(flag, help=help, **typer_options)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])


def takes(*options: inspect.Parameter) -> Callable[[Callable], Callable]:
    """Give ``fn(..., **flags)`` one keyword parameter per option: Typer reads a command's
    parameters from its signature, so the options become its flags and arrive in ``flags``."""

    def declare(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = signature.replace(parameters=[*fixed, *options])
        fn.__annotations__ = {p.name: p.annotation for p in [*fixed, *options]}
        return fn

    return declare


def zoo_module(name: str) -> ModuleType:
    """``zoo.<name>`` for a module that imports only the standard library (``catalogue``,
    ``header``), loaded without running ``zoo/__init__.py``, which imports torch and timm
    (seconds): what keeps `zoo list` and `zoo info` fast."""
    if "zoo" in sys.modules:
        return importlib.import_module(f"zoo.{name}")
    if LIGHT_PACKAGE not in sys.modules:  # zoo's folder as a package whose __init__ never runs,
        package = ModuleType(LIGHT_PACKAGE)  # so that these modules' relative imports (.schema) work
        package.__path__ = list(importlib.util.find_spec("zoo").submodule_search_locations)  # not imported
        sys.modules[LIGHT_PACKAGE] = package
    return importlib.import_module(f"{LIGHT_PACKAGE}.{name}")


LIGHT_PACKAGE = "_zoo_light"  # not "zoo": the package itself is not loaded


def weights_file(weights: str | Path, pretrained: bool) -> Path:
    """The weights file a command reads: a path, or with ``--pretrained`` the shipped weights
    of a catalogue name (the same for every command that takes a weights file)."""
    catalogue = zoo_module("catalogue")
    if pretrained:
        return catalogue.pretrained_file(str(weights))
    path = Path(weights)
    if not path.exists() and str(weights) in catalogue.MODELS:
        raise ValueError(
            f"no such weights file: {weights} (a catalogue name: add --pretrained for its shipped weights)"
        )
    if path.is_dir():  # a family folder (zoo.save_pretrained): its weights, once its config.json agrees
        header = zoo_module("header")
        header.read_header(path)
        return header.weights_path(path)
    return path


def readable_weights(weights: str | Path, pretrained: bool, command: str) -> Path:
    """:func:`weights_file`, checked before any heavy import (a typo answers at once): it exists,
    is not an ONNX file (those are run with `zoo run`), and holds a zoo header naming a known
    architecture."""
    path = weights_file(weights, pretrained)
    if path.suffix.lower() == ".onnx":
        raise ValueError(
            f"zoo {command} takes a weights file (.safetensors) or a family (folder, or a catalogue name with "
            f"--pretrained); {path} is an exported ONNX file: run it with `zoo run {path} INPUTS...`"
        )
    header = zoo_module("header").read_header(path)  # one line for a missing, foreign or corrupt file
    zoo_module("catalogue").check_name(header["arch"])
    return path


def check_data_path(spec: str | None, flag: str) -> None:
    """A data spec's path exists (checked before torch loads; the data layer checks the rest)."""
    kind, _, arg = (spec or "").partition(":")
    if kind in ("cifar10", "cifar100", "folder", "text") and arg and not Path(arg).expanduser().exists():
        raise FileNotFoundError(f"{flag} {spec}: data path not found: {Path(arg).expanduser()}")


PRETRAINED = typer.Option(
    False, "--pretrained", help="WEIGHTS is a catalogue name: use its shipped weights (see `zoo list`)."
)
