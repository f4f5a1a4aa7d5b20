"""Bring your own model: a timm model (and its checkpoint) becomes a zoo family.

    family = zoo.from_timm("resnet18", checkpoint="ckpt.safetensors", order="activation", calibration=batches)

Steps: read the checkpoint (safetensors, or a PyTorch state dict read with ``weights_only=True``;
the class count, input channels and a ViT's image size come from its shapes); build the timm
model and load it; check every part of it against what zoo's family of the same kind computes,
refusing the first unsupported part by name; copy it into the dense zoo family at full width
(batch-norm statistics become the full member's); permute every elastic dimension by importance
(:mod:`zoo.importance`); build the requested family (factorized layers: the SVD of each
pretrained matrix, components by singular value, so rank 1.0 is the original layer);
recalibrate batch norm of the members below full width on the calibration batches; verify that
the full member computes what the timm model computes (max abs difference, recorded).

What converts is the families' knowledge, beside each model as timm keeps its
``checkpoint_filter_fn``: a family module registers a planner for a timm class (``@converts``)
that checks the timm model part by part with ``require`` and returns a :class:`Plan`; this
module keeps the generic machinery (reading checkpoints, copying, SVD factorizing, verifying).
Supported today: timm's ResNets with basic or bottleneck blocks and the plain stem (resnet18,
34, 50, 101, 152), MobileNetV2 (``mobilenetv2_*``), and Vision Transformers with standard
blocks and a class token (``vit_*_patch*``, ``deit_*`` without a distillation token).
Training-only regularisers (dropout, drop path, DropBlock) compute nothing at inference and
are not carried.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .base import ElasticModel
from .importance import ORDERS, reorder
from .layers import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear, _svd_factors
from .registry import create_uninitialized
from .slicing import recalibrate_bn
from .space import DEFAULT_GRID, check_fraction
from .weights import file_sha256

TOLERANCE = 1e-4  # max abs difference at full width, relative to the logits' scale when above 1


class UnsupportedModel(ValueError):
    """A timm model (or a part of it) that zoo cannot express exactly; one line naming it."""


@dataclass
class Plan:
    """How one timm model becomes a zoo family: the catalogue variant, its architecture
    arguments, and which timm module fills which zoo module."""

    name: str  # the timm model's name, for messages
    arch: str
    args: dict
    modules: list[tuple[str, str]] = field(default_factory=list)  # (zoo module, timm module)
    tensors: list[tuple[str, str]] = field(default_factory=list)  # (zoo parameter, timm parameter)


# ----- timm model -> plan: each family's planner, registered by its module ---------------------
Planner = Callable[[nn.Module, str], Plan]
_PLANNERS: dict[type, tuple[Planner, str]] = {}  # timm class -> (planner, what the family converts)


def converts(timm_class: type, supports: str) -> Callable[[Planner], Planner]:
    """Register a family's planner for timm models of ``timm_class`` (subclasses reach it too,
    and it refuses them by name): it checks the model part by part and returns the ``Plan``.
    ``supports`` says in words which of those models convert (for the refusal message)."""

    def decorator(planner: Planner) -> Planner:
        _PLANNERS[timm_class] = (planner, supports)
        return planner

    return decorator


# A family that takes whatever no planner took (``zoo/models/graph.py``): ``builder(model, name,
# timm_args, img_size, widths, order, batches)`` returns the family, its full member equal to the
# model, channels ordered, other members' statistics fresh; or raises ``UnsupportedModel``.
_ANY: list[Callable] = []


def converts_any(builder: Callable) -> Callable:
    """Register the family that converts any timm model no planner takes (at most one)."""
    _ANY[:] = [builder]
    return builder


def supported() -> str:
    """What zoo converts, in words: every registered family's ``supports``."""
    return ", ".join(supports for _, supports in _PLANNERS.values())


def plan_for(model: nn.Module, name: str) -> Plan:
    """Check ``model`` part by part and say how to copy it; refuses the first unsupported part."""
    for cls in type(model).__mro__:
        if cls in _PLANNERS:
            return _PLANNERS[cls][0](model, name)
    raise refuse(name, f"the {type(model).__name__} architecture")


def refuse(name: str, part: str) -> UnsupportedModel:
    return UnsupportedModel(f"cannot convert {name}: {part} is not supported (zoo converts {supported()})")


def require(ok: bool, name: str, part) -> None:
    """Refuse ``part`` (a string, or a function giving it when the message needs ``not ok``)."""
    if not ok:
        raise refuse(name, part() if callable(part) else part)


def is_type(module: nn.Module, cls: type) -> bool:
    """Exactly ``cls``: a subclass may compute something else."""
    return type(module) is cls


def kind(module: nn.Module) -> str:
    return type(module).__name__


def require_linear_head(model: nn.Module, name: str, attr: str) -> None:
    head = getattr(model, attr)
    require(is_type(head, nn.Linear), name, f"a model without a linear classifier ({attr} is {kind(head)})")


def require_avg_pool(model: nn.Module, name: str) -> None:
    pool = model.global_pool
    require(
        getattr(pool, "pool_type", None) == "avg", name, f"global pooling {getattr(pool, 'pool_type', kind(pool))!r}"
    )


# ----- copying -------------------------------------------------------------------------------
def _check_layer(plan: Plan, ours: nn.Module, theirs: nn.Module, where: str) -> None:
    """The zoo layer computes what the timm layer computes (same op, sizes and settings)."""
    if isinstance(ours, ElasticConv2d):
        groups = theirs.in_channels if ours.depthwise else 1
        settings = (theirs.kernel_size, theirs.stride, theirs.padding, theirs.dilation, theirs.groups)
        expected = ((ours.kernel_size,) * 2, (ours.stride,) * 2, (ours.padding,) * 2, (1, 1), groups)
        same = is_type(theirs, nn.Conv2d) and theirs.padding_mode == "zeros" and settings == expected
        require(same, plan.name, f"the convolution {where} ({theirs})")
    elif isinstance(ours, ElasticLinear):
        require(is_type(theirs, nn.Linear), plan.name, f"the layer {where} ({kind(theirs)})")
    elif isinstance(ours, ElasticBatchNorm2d):
        require(
            isinstance(theirs, nn.BatchNorm2d) and theirs.affine and theirs.track_running_stats,
            plan.name,
            f"the normalisation {where} ({kind(theirs)})",
        )
        require(
            math.isclose(theirs.eps, ours.eps),
            plan.name,
            f"the batch-norm eps {theirs.eps:g} of {where} (zoo uses {ours.eps:g})",
        )
    elif isinstance(ours, nn.LayerNorm):
        from timm.layers import LayerNorm  # timm's own computes F.layer_norm too

        require(
            type(theirs) in (nn.LayerNorm, LayerNorm) and theirs.elementwise_affine,
            plan.name,
            f"the normalisation {where} ({kind(theirs)})",
        )
        require(
            math.isclose(theirs.eps, ours.eps),
            plan.name,
            f"the LayerNorm eps {theirs.eps:g} of {where} (zoo uses {ours.eps:g})",
        )


@torch.no_grad()
def _copy(plan: Plan, source: nn.Module, family: ElasticModel) -> None:
    """Fill the dense full-width family from the timm model; every timm tensor must be used."""
    key = family.largest.key
    used, filled = set(), set()

    def put(ours: str, tensor: torch.Tensor | None, theirs: str) -> None:
        target = family.get_parameter(ours) if "running_" not in ours else family.get_buffer(ours)
        if tensor is None:  # a bias timm's layer does not have: zero computes the same
            target.zero_()
        else:
            require(
                tuple(tensor.shape) == tuple(target.shape),
                plan.name,
                f"{theirs} of shape {tuple(tensor.shape)} (zoo's {ours} is {tuple(target.shape)})",
            )
            target.copy_(tensor)
            used.add(theirs)
        filled.add(ours)

    for ours_name, theirs_name in plan.modules:
        ours, theirs = family.get_submodule(ours_name), source.get_submodule(theirs_name)
        _check_layer(plan, ours, theirs, theirs_name)
        for p in ("weight", "bias"):
            if getattr(ours, p, None) is not None:
                put(f"{ours_name}.{p}", getattr(theirs, p, None), f"{theirs_name}.{p}")
        if isinstance(ours, ElasticBatchNorm2d):
            put(f"{ours_name}.running_mean_{key}", theirs.running_mean, f"{theirs_name}.running_mean")
            put(f"{ours_name}.running_var_{key}", theirs.running_var, f"{theirs_name}.running_var")
            used.add(f"{theirs_name}.num_batches_tracked")
    for ours_name, theirs_name in plan.tensors:
        put(ours_name, source.get_parameter(theirs_name), theirs_name)
    left = [k for k in source.state_dict() if k not in used]
    require(not left, plan.name, f"the part {left[0] if left else ''} (no zoo layer computes it)")
    unfilled = [k for k in family.state_dict() if k not in filled]
    if unfilled:
        raise ValueError(f"converting {plan.name}: zoo's {unfilled[0]} was not filled (a bug in zoo.convert)")


@torch.no_grad()
def _factorize_from(dense: ElasticModel, family: ElasticModel) -> None:
    """Fill ``family`` (dense or low-rank, any members) from the dense full-width ``dense``:
    factorized layers get the SVD of the dense matrix; batch norm the full member's statistics."""
    full_dense, full = dense.largest.key, family.largest.key
    for name, module in family.named_modules():
        source = dense.get_submodule(name)
        if isinstance(module, ElasticBatchNorm2d):
            module.weight.copy_(source.weight)
            module.bias.copy_(source.bias)
            for buffer, tensor in module.named_buffers(recurse=False):
                kind, member = buffer.split("_", 2)[1], buffer.split("_", 2)[2]
                if member == full:
                    tensor.copy_(getattr(source, f"running_{kind}_{full_dense}"))
                else:  # fresh statistics, recalibrated below or refused on use
                    tensor.fill_(0.0 if kind == "mean" else 1.0)
            continue
        if isinstance(module, (ElasticConv2d, ElasticLinear)) and module.low_rank:
            u, v = _svd_factors(source.weight.flatten(1), module.v.shape[0])
            module.u.copy_(u.reshape(module.u.shape))
            module.v.copy_(v.reshape(module.v.shape))
            if module.bias is not None:
                module.bias.copy_(source.bias)
            continue
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            tensor.copy_(getattr(source, pname))


# ----- checkpoints ---------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a PyTorch checkpoint, without unpickling code:
    ``torch.load(weights_only=True)`` (timm's training checkpoints, which add the run's
    ``argparse.Namespace``, load too). Nested ``state_dict``/``model`` and DDP's ``module.``
    prefix are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            if found:
                raise ValueError(
                    f"{path} holds more than tensors ({found.group(1)}) and was not unpickled (weights_only=True)"
                ) from None
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint (its pickle stream has what no state dict holds)"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({_first_line(err)})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _shape_args(name: str, state: dict[str, torch.Tensor]) -> dict:
    """num_classes, in_chans and (ViTs) img_size that the checkpoint's shapes say."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    args = {}
    classifier = getattr(cfg, "classifier", None)
    first = getattr(cfg, "first_conv", None)
    if isinstance(classifier, str) and f"{classifier}.weight" in state:
        args["num_classes"] = int(state[f"{classifier}.weight"].shape[0])
    if isinstance(first, str) and f"{first}.weight" in state and state[f"{first}.weight"].dim() == 4:
        weight = state[f"{first}.weight"]
        args["in_chans"] = int(weight.shape[1])
        if "pos_embed" in state and first.startswith("patch_embed"):
            tokens, patch = state["pos_embed"].shape[1] - 1, int(weight.shape[-1])
            side = math.isqrt(max(tokens, 0))
            if side * side == tokens and side > 0:
                args["img_size"] = side * patch
    return args


def check_fits(name: str, model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """One line naming the first tensors where a checkpoint and the architecture differ."""
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = [
        f"{k} has shape {tuple(given[k].shape)}, {name} expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    problems += [f"missing {k}" for k in expected if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in expected]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"checkpoint {path} does not fit {name}: {'; '.join(problems[:3])}{more}")


def timm_model(name: str, checkpoint: str | os.PathLike | None = None, **overrides) -> tuple[nn.Module, dict]:
    """Build timm's ``name`` (with the checkpoint's class count, channels and image size unless
    ``overrides`` say otherwise) and load the checkpoint. Returns the model and where it came from."""
    import timm
    from timm.models import is_model, split_model_name_tag

    base = split_model_name_tag(name)[0]
    if not is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        raise ValueError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    args = {
        **(_shape_args(base, state) if state is not None else {}),
        **{k: v for k, v in overrides.items() if v is not None},
    }
    if "img_size" in args and not _takes_img_size(base):
        args.pop("img_size")  # a model without the argument takes any size: it is only recorded
    try:
        model = timm.create_model(name, pretrained=False, **args)
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"timm cannot build {name} with {args}: {_first_line(err)}") from None
    source = {"timm": name}
    if state is not None:
        check_fits(name, model, state, checkpoint)
        model.load_state_dict(state, strict=False)  # fits: only num_batches_tracked may be absent
        source.update(checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint))
    return model, source


# ----- the conversion ------------------------------------------------------------------------
def _members(values: Iterable[float] | None, default: Iterable[float], name: str) -> list[float]:
    chosen = {check_fraction(name, v) for v in (default if values is None else values)}
    return sorted(chosen | {1.0})


@torch.no_grad()
def max_difference(
    source: nn.Module, family: ElasticModel, batch_sizes: Iterable[int] = (1, 3), seed: int = 0
) -> tuple[float, float]:
    """Max abs difference between the timm model and the family's full member (eval mode,
    random inputs at each batch size), and the largest logit magnitude."""
    generator = torch.Generator().manual_seed(seed)
    size = family.pretrained_cfg["input_size"]
    return compare_largest(source, family, [torch.randn(n, *size, generator=generator) for n in batch_sizes], source)


@torch.no_grad()
def compare_largest(
    source: nn.Module, family: ElasticModel, inputs: Iterable[torch.Tensor], logits: Callable
) -> tuple[float, float]:
    """Max abs difference between ``logits(x)`` (the source's) and the family's full member on
    each input, both in eval mode (their modes and the family's member restored), and the
    largest logit magnitude: what every conversion checks before it returns."""
    was = source.training, family.training
    previous = family.active_member
    source.eval(), family.eval()
    family.set_member(family.largest)
    worst, scale = 0.0, 0.0
    try:
        for x in inputs:
            expected = logits(x)
            worst = max(worst, (family(x) - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    finally:
        source.train(was[0]), family.train(was[1])
        family.set_member(previous, for_training=True)
    return worst, scale


def from_timm(
    source: str | nn.Module,
    *,
    checkpoint: str | os.PathLike | None = None,
    order: str = "weight",
    calibration: Iterable[torch.Tensor] | Callable[[tuple[int, int, int]], Iterable[torch.Tensor]] | None = None,
    low_rank: bool = False,
    widths: Iterable[float] | None = None,
    ranks: Iterable[float] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
) -> ElasticModel:
    """A zoo family made from a timm model (a name, with an optional checkpoint, or the model).

    ``order``: ``weight``, ``activation`` (needs ``calibration``: input batches, or a function
    of the input size ``(C, H, W)`` that returns them) or ``none``. ``widths`` (and ``ranks``
    with ``low_rank=True``) are the family's members (the full one is always added; defaults as
    ``zoo train``'s). Batch-norm families need
    ``calibration`` for members below full width (their statistics are estimated on it);
    without it only the full member is kept. The full member computes what the timm model
    computes: checked here on random inputs, the difference recorded in
    ``model.zoo_metadata["converted_from"]``. A model no hand-written family converts becomes
    a graph family (``zoo/models/graph.py``: one width per channel group of its dependency graph).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if ranks is not None and not low_rank:
        raise ValueError("ranks were given, but the family is built dense; convert with low_rank=True")
    if isinstance(source, str):
        model, origin = timm_model(source, checkpoint, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        name = source
    else:
        if checkpoint is not None:
            raise ValueError("give a timm model name with a checkpoint, or a model with its weights loaded, not both")
        model, name = source, (getattr(source, "pretrained_cfg", None) or {}).get("architecture", type(source).__name__)
        origin = {"timm": name}
    request = _Request(name, order, low_rank, widths, ranks, calibration, img_size)
    try:
        family, batches = _planned(model, request)
    except UnsupportedModel as refused:
        if low_rank or not _ANY:
            raise
        try:
            family, batches = _generic(model, request, _timm_args(model, img_size))
        except UnsupportedModel as err:
            planned = any(cls in _PLANNERS for cls in type(model).__mro__)  # a planner refused a part of it
            raise UnsupportedModel(f"{refused}; as a graph family: {err}" if planned else str(err)) from None
    return _finish(model, family, batches, name, origin, order)


@dataclass
class _Request:
    name: str
    order: str
    low_rank: bool
    widths: Iterable[float] | None
    ranks: Iterable[float] | None
    calibration: object
    img_size: int | None


def _batches(request: _Request, input_size: tuple[int, int, int]) -> list | None:
    calibration = request.calibration
    if callable(calibration):
        calibration = calibration(input_size)
    batches = list(calibration) if calibration is not None else None
    if request.order == "activation" and not batches:
        raise ValueError("order 'activation' needs calibration batches (--calibrate DATA)")
    return batches


def _family_widths(request: _Request, uses_batchnorm: bool, batches, arch: str):
    """The members' widths and ranks: without calibration data a batch-norm family keeps only its full member."""
    low_rank = request.low_rank
    family_widths = _members(request.widths, [1.0] if low_rank else DEFAULT_GRID, "width")
    family_ranks = _members(request.ranks, DEFAULT_GRID, "rank") if low_rank else None
    below_full = family_widths != [1.0] or (low_rank and family_ranks != [1.0])
    if uses_batchnorm and batches is None and below_full:
        if request.widths is not None or request.ranks is not None:
            raise ValueError(
                f"{arch}: members below full width or rank need batch-norm statistics; "
                "give calibration data (--calibrate DATA)"
            )
        family_widths, family_ranks = [1.0], ([1.0] if low_rank else None)
    return family_widths, family_ranks


def _planned(model: nn.Module, request: _Request) -> tuple[ElasticModel, list | None]:
    """A hand-written family's conversion: its planner's plan, copied, ordered, factorized."""
    plan = plan_for(model, request.name)
    plan.args.setdefault(
        "img_size",
        request.img_size or int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]),
    )
    batches = _batches(request, (plan.args["in_chans"], plan.args["img_size"], plan.args["img_size"]))
    dense = create_uninitialized(plan.arch, **plan.args, widths=[1.0])
    _copy(plan, model, dense)
    reorder(dense, request.order, batches)
    family_widths, family_ranks = _family_widths(request, dense.uses_batchnorm, batches, plan.arch)
    family = create_uninitialized(
        plan.arch, **plan.args, low_rank=request.low_rank, widths=family_widths, ranks=family_ranks
    )
    _factorize_from(dense, family)
    return family, batches


def _timm_args(model: nn.Module, img_size: int | None) -> dict:
    """timm arguments the graph family records to rebuild the model: the image size of a model
    that takes one (``timm_model`` passes it to those only: Visformer's and HaloNet's layers are
    built for it, though their first layer is a conv stem)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first, name = str(cfg.get("first_conv") or ""), cfg.get("architecture")
    takes = _takes_img_size(name) if name else first.startswith("patch_embed")
    return {"img_size": img_size} if img_size is not None and takes else {}


@functools.lru_cache(maxsize=64)
def _takes_img_size(name: str) -> bool:
    """Whether timm's ``name`` has an ``img_size`` argument (efficientvim embeds patches and takes
    none): built once with it on the meta device."""
    import timm

    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, img_size=224)
    except TypeError as err:
        return "img_size" not in str(err)
    except Exception:  # a failure not about the argument: building the model reports it
        return True
    return True


def _generic(model: nn.Module, request: _Request, timm_args: dict) -> tuple[ElasticModel, list | None]:
    """The graph family's conversion (``converts_any``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = request.img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    batches = _batches(request, (_in_chans(model), size, size))
    family_widths, _ = _family_widths(request, _has_batchnorm(model), batches, request.name)
    family = _ANY[0](model, request.name, timm_args, size, family_widths, request.order, batches)
    return family, batches


def _in_chans(model: nn.Module) -> int:
    return int(
        getattr(model, "in_chans", None) or next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    )


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def _finish(
    model: nn.Module, family: ElasticModel, batches: list | None, name: str, origin: dict, order: str
) -> ElasticModel:
    """Recalibrate the members below full width, check the full member against timm, record where it came from."""
    recalibrated = []
    if family.uses_batchnorm and batches:
        for member in family.members:
            if member != family.largest:
                recalibrate_bn(family, batches, member)
                recalibrated.append(member.to_dict())
    difference, scale = max_difference(model, family)
    if not difference <= TOLERANCE * max(1.0, scale):
        raise ValueError(
            f"converting {name} is not exact: max abs difference {difference:.3g} at full width "
            f"(logits up to {scale:.3g}); please report this"
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") and len(cfg["mean"]) == family.in_chans:
        family.pretrained_cfg = {**family.pretrained_cfg, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    family.zoo_metadata = {
        "converted_from": {
            **origin,
            "family": family.arch,
            "order": order,
            "calibration_batches": len(batches) if batches else 0,
            "recalibrated": recalibrated,
            "max_abs_diff": difference,
            **({"fixed_groups": family.fixed_groups} if getattr(family, "fixed_groups", None) else {}),
            **({"unordered_groups": family.unordered_groups} if getattr(family, "unordered_groups", None) else {}),
        },
        "mean": list(family.pretrained_cfg["mean"]),
        "std": list(family.pretrained_cfg["std"]),
    }
    return family.train()
