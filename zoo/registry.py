"""The catalogue as built: every registered variant, and building one by name.

A variant is one catalogue name: its family, its class and the arguments it fixes (the layout
that makes ``slim_resnet50`` a ResNet-50), plus the defaults it gives the user's arguments.
The family modules register their variants when imported (``zoo/__init__.py`` imports
:mod:`zoo.models`; see :mod:`zoo.models._builder` for ``register_family``), so this module
knows no family, no file format and no timm: what builds, loads and converts a family
imports it, never the other way round.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch

from .base import ElasticModel
from .catalogue import unknown_model


@dataclass(frozen=True)
class Variant:
    """One catalogue name: how its entrypoint builds it."""

    name: str
    family: str
    cls: type[ElasticModel]
    fixed_args: dict  # what the variant fixes: the user cannot pass these
    defaults: dict = field(default_factory=dict)  # user arguments' defaults, except for shipped weights
    entrypoint: Callable[..., ElasticModel] | None = None


_VARIANTS: dict[str, Variant] = {}


def add_variant(variant: Variant) -> None:
    if variant.name in _VARIANTS:
        raise ValueError(f"{variant.name} is registered twice")
    _VARIANTS[variant.name] = variant


def variant(name: str) -> Variant:
    if name not in _VARIANTS:
        raise ValueError(unknown_model(name, sorted(_VARIANTS)))
    return _VARIANTS[name]


def variants(cls: type[ElasticModel]) -> list[Variant]:
    """The registered variants of one family class, in registration order."""
    return [v for v in _VARIANTS.values() if v.cls is cls]


def list_models(pattern: str | None = None) -> list[str]:
    """Catalogue names, sorted; ``pattern`` is an fnmatch filter like timm's."""
    return [n for n in sorted(_VARIANTS) if pattern is None or fnmatch.fnmatch(n, pattern)]


def family_of(name: str) -> str:
    return variant(name).family


def create_model(name: str, pretrained: bool = False, **kwargs) -> ElasticModel:
    """Build a catalogue model. ``pretrained=True`` loads the weights shipped in ``weights/``;
    ``features_only=True`` (``out_indices``) returns it as a backbone (``zoo.features.FeatureNet``)."""
    return variant(name).entrypoint(pretrained=pretrained, **kwargs)


def create_uninitialized(name: str, device: str | torch.device = "cpu", **kwargs) -> ElasticModel:
    """Build a model whose tensors hold garbage: no random init, no SVDs. For callers that
    overwrite every tensor (loading a file, slicing a family)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return model.to_empty(device=device)
