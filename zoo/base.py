"""The face every family shows: its space of sub-networks, and choosing one of them.

A family model is built from plain arguments (``model_args``) and can be rebuilt from them;
``max_width``/``max_rank`` say how large it physically is (1.0 for a full family, the chosen
sizes for a sliced member) and ``widths``/``ranks`` give the grid of sub-networks it was
trained for, which is also the set that has batch-norm statistics.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .layers import ElasticBatchNorm2d, ElasticLayer, LayerFactory
from .subnet import DEFAULT_GRID, Subnet, check_fraction, grid


def image_cfg(in_chans: int, img_size: int, num_classes: int, first_conv: str, classifier: str) -> dict:
    """timm's ``pretrained_cfg`` for an image family (inputs normalised with mean/std 0.5)."""
    return {
        "input_size": (in_chans, img_size, img_size),
        "num_classes": num_classes,
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "first_conv": first_conv,
        "classifier": classifier,
    }


def _order(subnet: Subnet) -> tuple[float, float]:
    return (subnet.width, subnet.rank or 0.0)


class ElasticModel(nn.Module):
    """Base class of all families. Subclasses build layers from ``ElasticLayer`` types.

    Subclasses call ``super().__init__(...)`` first, build their layers, then call
    ``self._finish_init()``.
    """

    arch: str = ""  # set by the registry to the catalogue name
    model_args: dict  # arguments that rebuild this model with zoo.create_model(arch, **model_args)
    input_kind: str = "image"  # "image" (float NCHW) or "tokens" (int64 NT)

    def __init__(
        self,
        *,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_width: float = 1.0,
        max_rank: float = 1.0,
        extra_subnets: Iterable[dict] = (),
    ):
        super().__init__()
        self.low_rank = bool(low_rank)
        self.max_width = check_fraction("max_width", max_width)
        self.max_rank = check_fraction("max_rank", max_rank) if self.low_rank else None
        if not self.low_rank and ranks is not None and list(ranks) not in ([], [1.0]):
            raise ValueError("ranks were given, but the family is built dense; build it with low_rank=True")
        widths = [check_fraction("width", w, self.max_width) for w in widths]
        ranks = [check_fraction("rank", r, self.max_rank) for r in (DEFAULT_GRID if ranks is None else ranks)] if self.low_rank else None
        if not widths or (ranks is not None and not ranks):
            raise ValueError("the sub-network grid needs at least one width (and one rank for low-rank families)")
        extra = [self.resolve_subnet(**d) for d in extra_subnets]
        self.subnets: list[Subnet] = sorted(set(grid(widths, ranks) + extra), key=_order)
        self.model_args = {}

    def _layer_factory(self, divisor: int) -> LayerFactory:
        """A factory for layers of this model's sizes and grid (kept for reset_classifier)."""
        self._factory = LayerFactory(max_width=self.max_width, low_rank=self.low_rank, max_rank=self.max_rank, subnets=self.subnets, divisor=divisor)
        return self._factory

    def _finish_init(self) -> None:
        self.set_subnet(self.subnets[-1])  # the largest trained member (the grid is sorted)

    # ----- the space ------------------------------------------------------------------
    @property
    def axes(self) -> tuple[str, ...]:
        return ("width", "rank") if self.low_rank else ("width",)

    @property
    def largest(self) -> Subnet:
        return Subnet(self.max_width, self.max_rank)

    @property
    def uses_batchnorm(self) -> bool:
        return any(isinstance(m, ElasticBatchNorm2d) for m in self.modules())

    def describe_space(self) -> str:
        """One line naming the axes, their ranges and the trained grid."""
        widths = sorted({s.width for s in self.subnets})
        text = f"{self.arch or type(self).__name__}: width in (0, {self.max_width:g}]"
        if self.low_rank:
            text += f", rank in (0, {self.max_rank:g}]"
        text += f"; trained widths {', '.join(f'{w:g}' for w in widths)}"
        if self.low_rank:
            text += f", ranks {', '.join(f'{r:g}' for r in sorted({s.rank for s in self.subnets}))}"
        return text

    def resolve_subnet(self, width: float | None = None, rank: float | None = None, **other) -> Subnet:
        """Validate a requested sub-network against this model's space; None means largest."""
        name = self.arch or type(self).__name__
        if other:
            raise ValueError(f"{name} has axes {', '.join(self.axes)}; unknown axis {', '.join(sorted(other))}")
        if rank is not None and not self.low_rank:
            raise ValueError(f"{name} is built dense and has no rank axis (create it with low_rank=True)")
        width = self.max_width if width is None else check_fraction("width", width, self.max_width)
        if self.low_rank:
            rank = self.max_rank if rank is None else check_fraction("rank", rank, self.max_rank)
        return Subnet(width, rank)

    def needs_calibration(self, subnet: Subnet) -> bool:
        """True for a batch-norm member without statistics (one outside the trained grid)."""
        return self.uses_batchnorm and subnet not in self.subnets

    def trained_members(self) -> str:
        """The trained grid as one line, e.g. ``width=0.5; width=1``."""
        return "; ".join(str(s) for s in self.subnets)

    def set_subnet(self, width: float | None = None, rank: float | None = None, **other) -> Subnet:
        """Make every layer run the chosen sub-network. Returns it.

        Batch-norm families only accept sub-networks that have statistics (the trained grid);
        others need :func:`zoo.recalibrate_bn` first.
        """
        subnet = width if isinstance(width, Subnet) and rank is None and not other else self.resolve_subnet(width, rank, **other)
        if self.needs_calibration(subnet):
            raise ValueError(
                f"{self.arch or type(self).__name__} has no batch-norm statistics for {subnet} "
                f"(it has: {self.trained_members()}); recalibrate it on data first "
                "(zoo.recalibrate_bn, or `zoo slice --calibrate DATA`)"
            )
        for module in self.modules():
            if isinstance(module, ElasticLayer):
                module.set_subnet(subnet)
        self._active = subnet
        return subnet

    @property
    def active_subnet(self) -> Subnet:
        return self._active

    def add_subnet(self, subnet: Subnet) -> None:
        """Add ``subnet`` to the grid with fresh batch-norm statistics (see recalibrate_bn)."""
        if subnet in self.subnets:
            return
        for module in self.modules():
            if isinstance(module, ElasticBatchNorm2d):
                module.add_stats(subnet)
        self.subnets = sorted([*self.subnets, subnet], key=_order)
        self.model_args["extra_subnets"] = [*self.model_args.get("extra_subnets", []), subnet.to_dict()]

    # ----- timm's model face ----------------------------------------------------------
    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def _replace_classifier(self, name: str, classifier: nn.Module, num_classes: int) -> None:
        """Install a new classifier (for ``reset_classifier``) and record the class count in
        ``model_args`` too, so that a saved model rebuilds with the new classifier."""
        setattr(self, name, classifier)
        self.num_classes = num_classes
        self.model_args["num_classes"] = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self.set_subnet(self.active_subnet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """A random input of the shape this model expects (used by export and benchmarks)."""
        if self.input_kind == "tokens":
            return torch.randint(0, self.num_classes, (batch_size, seq_len or self.context_length))
        return torch.randn(batch_size, *self.pretrained_cfg["input_size"])
