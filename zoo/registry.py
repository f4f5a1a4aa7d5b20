"""The catalogue: family entrypoints, registered with zoo and with timm's registry.

Each family file ends with small ``@register_family`` functions, one per variant, that call
:func:`build` with the variant's fixed arguments. The user's own arguments are recorded as
``model.model_args`` so that the model can be rebuilt from a weights file alone.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import torch

from .base import ElasticModel

_ENTRYPOINTS: dict[str, Callable[..., ElasticModel]] = {}
_FAMILY: dict[str, str] = {}

# Arguments timm's create_model passes to every entrypoint that zoo's families do not take.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype")


def register_family(family: str) -> Callable[[Callable[..., ElasticModel]], Callable[..., ElasticModel]]:
    """Register an entrypoint under its function name, in zoo and in timm."""

    def decorator(fn: Callable[..., ElasticModel]) -> Callable[..., ElasticModel]:
        name = fn.__name__
        _ENTRYPOINTS[name] = fn
        _FAMILY[name] = family
        _register_with_timm(fn)
        return fn

    return decorator


def _register_with_timm(fn: Callable[..., ElasticModel]) -> None:
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints

    if _model_entrypoints.get(fn.__name__) is fn:
        return

    @functools.wraps(fn)
    def timm_entrypoint(pretrained: bool = False, **kwargs) -> ElasticModel:
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        model = fn(pretrained=pretrained, **{k: v for k, v in kwargs.items() if k not in _TIMM_ONLY})
        return model.to(device=device, dtype=dtype) if device or dtype else model

    register_model(timm_entrypoint)


def build(cls: type[ElasticModel], arch: str, pretrained: bool, fixed_args: dict, user_args: dict) -> ElasticModel:
    """Construct ``cls``; record how to rebuild it; load shipped weights if asked."""
    user_args = {k: v for k, v in user_args.items() if k not in _TIMM_ONLY}
    if pretrained:
        from .weights import load_pretrained

        return load_pretrained(arch, **user_args)
    try:
        model = cls(**fixed_args, **user_args)
    except TypeError as err:  # an argument the family does not take
        raise ValueError(f"{arch}: {str(err).split('()', 1)[-1].strip()}") from None
    model.arch = arch
    model.model_args = {**_jsonable(user_args), **model.model_args}
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": arch}
    return model


def _jsonable(args: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def list_models(pattern: str | None = None) -> list[str]:
    """Catalogue names, sorted; ``pattern`` is an fnmatch filter like timm's."""
    import fnmatch

    _import_families()
    names = sorted(_ENTRYPOINTS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def family_of(name: str) -> str:
    _import_families()
    return _FAMILY[name]


def create_model(name: str, pretrained: bool = False, **kwargs) -> ElasticModel:
    """Build a catalogue model. ``pretrained=True`` loads the weights shipped in ``weights/``."""
    _import_families()
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_ENTRYPOINTS))}")
    return _ENTRYPOINTS[name](pretrained=pretrained, **kwargs)


def create_uninitialized(name: str, device: str | torch.device = "cpu", **kwargs) -> ElasticModel:
    """Build a model whose tensors hold garbage: no random init, no SVDs. For callers that
    overwrite every tensor (loading a file, slicing a family)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return model.to_empty(device=device)


def _import_families() -> None:
    if "zoo.models" not in sys.modules:
        import zoo.models  # noqa: F401  (registers every family)
