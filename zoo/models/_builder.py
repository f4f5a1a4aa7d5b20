"""Registering a family's variants, with zoo and (image families) with timm, and building them.

Each family module ends with small ``@register_family`` functions, one per variant, that say
the arguments the variant fixes and call :func:`build`. The user's own arguments are recorded
as ``model.model_args`` so that the model can be rebuilt from a weights file alone.

timm's registry is a registry of image models: its tools and tests feed every model images.
The byte-level GPTs read token ids, so they are registered with zoo only
(``register_family(..., timm=False)``); ``zoo.create_model`` and the CLI build them the same way.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable

from ..base import ElasticModel
from ..catalogue import PRETRAINED, pretrained_file, shipped_path
from ..features import features_only
from ..registry import Variant, add_variant, variant
from ..weights import load_pretrained

# Arguments timm's create_model passes to every entrypoint that zoo's families do not take.
# ``pretrained_model_args``: what timm read from a ``local-dir:``/``hf-hub:`` config (also passed as arguments).
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "cache_dir", "device", "dtype")
# timm's features_only arguments (popped when features_only is given, as timm's builder does).
_FEATURES = ("features_only", "out_indices", "feature_cls")


class UnknownArgument(TypeError, ValueError):
    """An argument the family does not take: a ``TypeError``, as for any timm model (and any
    Python call), and a ``ValueError``, zoo's user error that the CLI prints as one line."""


def register_family(
    family: str,
    cls: type[ElasticModel],
    fixed_args: dict | None = None,
    defaults: dict | None = None,
    timm: bool = True,
) -> Callable[[Callable[..., ElasticModel]], Callable[..., ElasticModel]]:
    """Register an entrypoint under its function name as a variant of ``cls`` that fixes
    ``fixed_args`` (``defaults``: its defaults for the user's arguments, not applied to shipped
    weights, which carry their own), in zoo and (``timm=True``: image families) in timm."""

    def decorator(fn: Callable[..., ElasticModel]) -> Callable[..., ElasticModel]:
        add_variant(Variant(fn.__name__, family, cls, dict(fixed_args or {}), dict(defaults or {}), fn))
        if timm:
            _register_with_timm(fn, cls)
        return fn

    return decorator


def _register_with_timm(fn: Callable[..., ElasticModel], cls: type[ElasticModel]) -> None:
    """Register with timm, with the shipped weights as pretrained tags (``slim_resnet20.digits``).

    timm reads an entrypoint's pretrained cfgs from ``default_cfgs`` in the entrypoint's module.
    """
    from timm.models import register_model
    from timm.models._builder import resolve_pretrained_cfg

    name = fn.__name__
    if name in PRETRAINED:
        module = sys.modules[fn.__module__]
        module.__dict__.setdefault("default_cfgs", {})[name] = _timm_default_cfg(name, cls)

    @functools.wraps(fn)
    def timm_entrypoint(pretrained: bool = False, **kwargs) -> ElasticModel:
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        given, overlay = kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
        args = {k: v for k, v in kwargs.items() if k not in _TIMM_ONLY}
        if pretrained:  # the file comes from the resolved cfg, so pretrained_cfg_overlay=dict(file=...) works
            if name not in PRETRAINED and not given and not overlay:
                pretrained_file(name)  # raises: no weights are shipped for this model
            cfg = resolve_pretrained_cfg(name, given, overlay)
            if not cfg.file:
                raise ValueError(f"the pretrained cfg of {name} names no local file; zoo loads weights from files only")
            features = _features_args(args)
            model = load_pretrained(name, cfg.file, **args)
            _reject_unknown(type(model), name, {}, args)
            model.pretrained_cfg = {**model.pretrained_cfg, "architecture": name, "tag": cfg.tag, "file": str(cfg.file)}
            model = _as_features(model, features)
        else:
            if name in PRETRAINED:  # as timm's builder: classes and input from the pretrained cfg
                _cfg_defaults(resolve_pretrained_cfg(name, given, overlay), args)
            model = fn(pretrained=False, **args)
        return model.to(device=device, dtype=dtype) if device or dtype else model

    register_model(timm_entrypoint)


def _timm_default_cfg(name: str, cls: type[ElasticModel]):
    """timm's pretrained cfg of the shipped weights of ``name``: a local file, no network."""
    from timm.models import generate_default_cfgs

    facts = PRETRAINED[name]
    cfg = dict(
        file=str(shipped_path(name)),
        license="apache-2.0",
        fixed_input_size=cls.fixed_input_size,  # a ViT takes its img_size only; a CNN any size
        description=f"zoo's shipped {name} family, trained on {facts['tag']} (weights/README.md)",
        **{k: v for k, v in facts.items() if k != "tag" and v is not None},  # input size, classes, mean, std
    )
    return generate_default_cfgs({f"{name}.{facts['tag']}": cfg})[name]


def _cfg_defaults(cfg, args: dict) -> None:
    """What timm's builder does for its own models: a model built by name takes its classes,
    input channels (and, for a fixed input size, the image size) from its pretrained cfg
    unless given."""
    args.setdefault("num_classes", cfg.num_classes)
    args.setdefault("in_chans", cfg.input_size[0])
    if cfg.fixed_input_size:
        args.setdefault("img_size", cfg.input_size[-1])


def build(arch: str, pretrained: bool, user_args: dict) -> ElasticModel:
    """Construct the variant ``arch``; record how to rebuild it; load shipped weights if asked;
    wrap it as a ``features_only`` backbone if asked."""
    found = variant(arch)
    user_args = {k: v for k, v in user_args.items() if k not in _TIMM_ONLY}
    features = _features_args(user_args)
    _reject_unknown(found.cls, arch, found.fixed_args, user_args)
    if pretrained:
        return _as_features(load_pretrained(arch, **user_args), features)
    user_args = {**found.defaults, **user_args}
    model = found.cls(**found.fixed_args, **user_args)
    model.arch = arch
    model.model_args = {**_jsonable(user_args), **model.model_args}
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": arch}
    return _as_features(model, features)


def _reject_unknown(cls: type[ElasticModel], arch: str, fixed_args: dict, args: dict) -> None:
    """``UnknownArgument`` for an argument ``cls`` does not take or the variant fixes."""
    takes = inspect.signature(cls).parameters
    for name in args:
        if name not in takes or name in fixed_args:
            raise UnknownArgument(f"{arch}: got an unexpected keyword argument {name!r}")


def _features_args(args: dict) -> dict | None:
    """Pop timm's features_only arguments from ``args``: None unless ``features_only``."""
    if not args.pop("features_only", False):
        return None
    return {k: args.pop(k) for k in _FEATURES[1:] if k in args}


def _as_features(model: ElasticModel, features: dict | None):
    return model if features is None else features_only(model, **features)


def _jsonable(args: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
