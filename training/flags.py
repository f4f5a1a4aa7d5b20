"""One check shared by the parts of a training configuration: a flag's value and its requirement,
reported with the flag's command-line name."""

from __future__ import annotations

from typing import Callable


def require(name: str, value: float | None, ok: Callable[[float], bool], requirement: str) -> None:
    """``--name must be <requirement>, got <value>`` unless ``value`` is None or ``ok``."""
    if value is not None and not ok(value):
        raise ValueError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")


def at_least_one(config: object, *names: str) -> None:
    for name in names:
        require(name, getattr(config, name), lambda v: v >= 1, "at least 1")


def non_negative(config: object, *names: str) -> None:
    for name in names:
        require(name, getattr(config, name), lambda v: v >= 0, "non-negative")
