"""The face every family shows: its space of members, and choosing one of them.

A family model is built from plain arguments (``model_args``) and can be rebuilt from them.
``max_member`` says how large it physically is (the whole family, or the member it was sliced
to) and ``widths``/``ranks`` (plus ``extra_members``) give the members it was trained for,
which are also the members that have batch-norm statistics.
"""

# No ``from __future__ import annotations`` in this module: torch.fx copies ``forward``'s
# annotations into the code of the graph it traces, which torch.jit then cannot read as strings.

from typing import Iterable, Mapping

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from .layers import Elastic, ElasticBatchNorm2d, LayerFactory, take_rows
from .space import DEFAULT_GRID, Dim, Member, Space, Values, check_fraction, fixed, grid


def image_cfg(in_chans: int, img_size: int, num_classes: int, first_conv: str, classifier: str, **extra) -> dict:
    """timm's ``pretrained_cfg`` for an image family (inputs normalised with mean/std 0.5);
    ``extra``: ``pool_size`` (the feature map at ``img_size``) or ``fixed_input_size``."""
    return {
        "input_size": (in_chans, img_size, img_size),
        "num_classes": num_classes,
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "first_conv": first_conv,
        "classifier": classifier,
        **extra,
    }


# timm's global pools that keep one feature per channel (``catavgmax`` doubles them, and an
# elastic classifier reads a prefix of one feature vector); "" is none: forward_head returns maps.
CNN_POOLS = ("avg", "max", "avgmax", "")


def check_nchw(output_fmt: str) -> None:
    """A CNN's ``forward_intermediates`` gives feature maps only."""
    if output_fmt != "NCHW":
        raise ValueError(f"a CNN's intermediate features are NCHW, got output_fmt={output_fmt!r}")


def as_member(member=None, rank: float | None = None, width: float | None = None, **axes) -> Member:
    """A member however it was given: a ``Member``, its JSON dict, a number (the uniform width)
    or keyword axes. Not yet validated (see ``ElasticModel.resolve_member``)."""
    if isinstance(member, (Member, Mapping)):
        if rank is not None or width is not None or axes:
            raise ValueError("give a member, or width/rank/axes, not both")
        return member if isinstance(member, Member) else Member.from_dict(member)
    if member is not None:
        if width is not None:
            raise ValueError("the width was given twice")
        width = member
    return Member(width, rank, **axes)


class ElasticModel(nn.Module):
    """Base class of all families. Subclasses build layers from ``Elastic`` types.

    Subclasses call ``super().__init__(space=..., ...)`` first, build their layers with
    ``self._layer_factory(divisor)``, then call ``self._finish_init()``.
    """

    arch: str = ""  # set by the registry to the catalogue name
    model_args: dict  # arguments that rebuild this model with zoo.create_model(arch, **model_args)
    input_kind: str = "image"  # "image" (float NCHW) or "tokens" (int64 NT)
    fixed_input_size: bool = False  # timm's cfg flag: True where the architecture fixes the image size

    def __init__(
        self,
        *,
        space: Space,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: Mapping | None = None,
        extra_members: Iterable[Mapping] = (),
    ):
        super().__init__()
        self.low_rank = bool(low_rank)
        self._space = space
        name = type(self).__name__
        if not self.low_rank and ranks is not None and list(ranks) not in ([], [1.0]):
            raise ValueError("ranks were given, but the family is built dense; build it with low_rank=True")
        self.max_values: Values = space.expand(as_member(max_member or {}), space.full(), f"{name} max_member")
        widths = [check_fraction("width", w) for w in widths]
        ranks = (
            [check_fraction("rank", r) for r in (DEFAULT_GRID if ranks is None else ranks)] if self.low_rank else None
        )
        members = grid(widths, ranks) if widths and (ranks is None or ranks) else []
        members += [as_member(d) for d in extra_members]
        if not members:
            raise ValueError(
                "the trained members need at least one width (and one rank for low-rank families), or an extra member"
            )
        self.members: list[Member] = self.sort_members({self.resolve_member(s) for s in members})
        self.model_args = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # torch.jit.script compiles a module's properties too; a family's describe it, none is
        # part of its forward
        cls.__jit_unused_properties__ = [n for n in dir(cls) if isinstance(getattr(cls, n, None), property)]

    def _layer_factory(self, divisor: int) -> LayerFactory:
        """A factory for layers of this model's sizes and members (kept for reset_classifier)."""
        members = [(s.key, self.expand(s)) for s in self.members]
        self._factory = LayerFactory(
            max_values=self.max_values, low_rank=self.low_rank, members=members, divisor=divisor
        )
        return self._factory

    def _finish_init(self) -> None:
        self.set_member(self.members[-1])  # the largest trained member (sorted smallest first)

    def couplings(self) -> list:
        """Every elastic dimension with the tensor axes coupled to it (``zoo.importance.Coupling``),
        which the family knows: importance ordering and conversion permute them."""
        raise ValueError(f"no importance ordering for {type(self).__name__}")

    def sort_members(self, members: Iterable[Member]) -> list[Member]:
        """Smallest first: mean width, then mean rank, then depth (ties by key)."""
        return sorted(members, key=lambda s: (self._space.size_key(self.expand(s)), s.key))

    # ----- the space ------------------------------------------------------------------
    @property
    def axes(self) -> tuple[str, ...]:
        """The member fields of this family (``width`` is the shorthand for all width axes)."""
        return self._space.axes

    @property
    def largest(self) -> Member:
        """The largest member this model physically holds."""
        return self._space.compact(self.max_values)

    @property
    def uses_batchnorm(self) -> bool:
        return any(isinstance(m, ElasticBatchNorm2d) for m in self.modules())

    @property
    def width_choices(self) -> list[float]:
        """Widths a sampled member draws from: the trained uniform widths (else the default grid)."""
        return sorted({s.width for s in self.members if s.width is not None}) or list(DEFAULT_GRID)

    @property
    def rank_choices(self) -> list[float] | None:
        if not self.low_rank:
            return None
        return sorted({s.rank for s in self.members if s.rank is not None}) or list(DEFAULT_GRID)

    def space(self) -> dict:
        """The choices of this family, JSON-ready: its groups, axes, limits and trained members."""
        described = self._space.describe(self.max_values, self.width_choices, self.rank_choices)
        return {
            "arch": self.arch,
            **described,
            "largest": self.largest.to_dict(),
            "trained": [s.to_dict() for s in self.members],
        }

    def sample_member(self, generator: torch.Generator | None = None, layerwise: bool = True) -> Member:
        """A random valid member: each stage's or block's width, rank and depth drawn
        independently (``layerwise=False``: one width and rank for all, full depth)."""
        values = self._space.sample(
            generator or torch.default_generator, self.width_choices, self.rank_choices, self.max_values, layerwise
        )
        return self._space.compact(values)

    def smallest_member(self, layerwise: bool = True) -> Member:
        """The smallest member ``sample_member`` can draw (the bottom of the sandwich)."""
        return self._space.compact(
            self._space.smallest(self.width_choices, self.rank_choices, self.max_values, layerwise)
        )

    def describe_space(self) -> str:
        """One line naming the member fields, their groups and the trained members."""
        space = self._space
        fields = ", ".join(space.axes)
        text = f"{self.arch or type(self).__name__}: {space.groups} {space.group}s with {fields} per {space.group}"
        return text + f"; trained members: {self.describe_members()}"

    def expand(self, member: Member) -> Values:
        """A canonical member's values, one per group of every axis."""
        return self._space.expand(member, self.max_values, self._name)

    @property
    def _name(self) -> str:
        return self.arch or type(self).__name__

    def resolve_member(self, member=None, rank: float | None = None, *, width: float | None = None, **axes) -> Member:
        """Validate a member (a ``Member``, its dict, a uniform width, or axes) against this
        model's space; the canonical ``Member``. Nothing given means the largest."""
        return self._space.compact(self.expand(as_member(member, rank, width, **axes)))

    def reset_stats(self, key: str, values: Values) -> None:
        """Fresh batch-norm statistics (mean 0, variance 1) for the member ``key``."""
        for module in self.modules():
            if isinstance(module, ElasticBatchNorm2d):
                module.add_stats(key, values)

    def norm_layers(self) -> list[nn.Module]:
        """The batch norms whose ``momentum`` a member's forward uses (recalibration sets it)."""
        return [m for m in self.modules() if isinstance(m, ElasticBatchNorm2d)]

    def member_part(self, member: Member, name: str, source: torch.Tensor, shape, chunks: int) -> torch.Tensor:
        """The part of the family's tensor ``name`` that ``member``'s own model holds under that
        name (``zoo.slice`` copies it): the first rows of each of ``chunks`` row blocks, then a
        prefix of every axis."""
        out = take_rows(source, shape[0] // chunks, chunks) if source.dim() else source
        return out[tuple(slice(0, n) for n in shape)] if out.dim() else out

    def needs_calibration(self, member: Member) -> bool:
        """True for a batch-norm member without statistics (one it was not trained for)."""
        return self.uses_batchnorm and member not in self.members

    def describe_members(self) -> str:
        """The trained members as one line, e.g. ``width=0.5; width=1``."""
        return "; ".join(str(s) for s in self.members)

    def set_member(
        self, member=None, rank: float | None = None, *, width: float | None = None, for_training: bool = False, **axes
    ) -> Member:
        """Make every layer run the chosen member. Returns it (canonical).

        Batch-norm families evaluate only members that have statistics (the trained ones);
        others need :func:`zoo.recalibrate_bn` first. ``for_training=True`` lets any member run
        in training mode, normalised with each batch's own statistics (layerwise training).
        """
        values = self.expand(as_member(member, rank, width, **axes))
        chosen = self._space.compact(values)
        if self.needs_calibration(chosen) and not for_training:
            raise ValueError(
                f"{self._name} has no batch-norm statistics for {chosen} "
                f"(it has: {self.describe_members()}); recalibrate it on data first "
                "(zoo.recalibrate_bn, or `zoo slice --calibrate DATA`)"
            )
        for module in self.modules():
            if isinstance(module, Elastic):
                module.set_member(values, chosen.key)
        self._active, self._active_values = chosen, values
        return chosen

    @property
    def active_member(self) -> Member:
        return self._active

    def add_member(self, member: Member) -> None:
        """Add ``member`` to the trained members with fresh batch-norm statistics (see
        recalibrate_bn)."""
        member = self.resolve_member(member)
        if member in self.members:
            return
        self.reset_stats(member.key, self.expand(member))
        self.members = self.sort_members([*self.members, member])
        self.model_args["extra_members"] = [*self.model_args.get("extra_members", []), member.to_dict()]

    # ----- timm's model face ----------------------------------------------------------
    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def _replace_classifier(self, name: str, classifier: nn.Module, num_classes: int) -> None:
        """Install a new classifier (for ``reset_classifier``) on the model's device and dtype,
        in its mode, and record the class count in ``model_args`` too, so that a saved model
        rebuilds with the new classifier."""
        like = next(self.parameters())
        setattr(self, name, classifier.to(device=like.device, dtype=like.dtype).train(self.training))
        self.num_classes = num_classes
        self.model_args["num_classes"] = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self.set_member(self.active_member, for_training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """A random input of the shape this model expects (used by export and benchmarks)."""
        if self.input_kind == "tokens":
            return torch.randint(0, self.num_classes, (batch_size, seq_len or self.context_length))
        return torch.randn(batch_size, *self.pretrained_cfg["input_size"])


class ImageModel(ElasticModel):
    """An image family as timm shows one: a classifier that can also be a backbone.

    Subclasses list their intermediate features in ``_taps`` (a :class:`Dim`, the reduction
    and the module of each), implement ``forward_intermediates`` and
    ``prune_intermediate_layers`` as timm's models do, and build classifiers with
    ``_classifier``. ``feature_info`` is computed from the active member, so its channels
    follow ``set_member``.
    """

    features_out_indices: int | tuple[int, ...] | None = None  # features_only's default: all taps

    @property
    def feature_info(self) -> list[dict]:
        """timm's feature_info, one dict per intermediate feature, at the active member."""
        return [
            {"num_chs": dim.count_in(self._active_values), "reduction": reduction, "module": module}
            for dim, reduction, module in self._taps
        ]

    @property
    def head_hidden_size(self) -> int:
        """Features ``forward_head(..., pre_logits=True)`` returns (timm's name)."""
        return self.num_features

    def _classifier(self, in_dim: Dim, num_classes: int, **kwargs) -> nn.Module:
        """A dense linear classifier over ``in_dim``, or none for ``num_classes=0`` (timm's
        headless model, whose forward returns the pooled features)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        return (
            self._factory.linear(in_dim, fixed(num_classes), factorize=False, **kwargs)
            if num_classes
            else nn.Identity()
        )

    def _pool(self, global_pool: str) -> SelectAdaptivePool2d:
        """A CNN's global pooling (timm's layer), flattened: ``global_pool`` from ``CNN_POOLS``."""
        global_pool = self._check_global_pool(global_pool, CNN_POOLS)
        pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))  # no pooling keeps the maps
        return pool.train(self.training)

    def _check_global_pool(self, global_pool: str, choices: tuple[str, ...]) -> str:
        """``global_pool`` if it is one of ``choices`` (the first is the default), recorded in
        ``model_args`` when it is not the default, so that a saved model rebuilds with it."""
        if global_pool not in choices:
            raise ValueError(
                f"{self._name}: global_pool must be one of {', '.join(map(repr, choices))}, got {global_pool!r}"
            )
        if global_pool != self.model_args.get("global_pool", choices[0]):
            self.model_args["global_pool"] = global_pool
        return global_pool
