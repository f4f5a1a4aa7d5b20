"""Sub-networks as data: the two nested axes, their rounding, and validation.

A sub-network is a point ``(width, rank)``. ``width`` in (0, 1] scales every elastic
dimension; ``rank`` in (0, 1] (low-rank families only) keeps a prefix of every factorized
layer's components. Both are nested: the member at a smaller value is a prefix of the one at
a larger value, so a sub-network is computed by slicing weights, never by masking them.

Rounding (documented, and the same everywhere, so a sliced model matches its elastic twin):

* channels: ``round(n * width / divisor) * divisor``, at least ``divisor`` and at most ``n``
  (half rounds up). CIFAR ResNets use divisor 4, ImageNet ResNets and MobileNetV2 use 8.
* attention heads: ``round(heads * width)``, at least 1 (divisor 1, half up). The head
  dimension is fixed, so ``slim_vit_tiny`` (3 heads) runs 1, 2, 2, 3 heads at widths
  0.25, 0.5, 0.75, 1.0.
* rank: a factorized ``m x n`` layer at active size keeps
  ``ceil(rank * min(m, n))`` components (at least 1), counted on the layer's *active*
  shape, so width and rank compose and rank 1.0 is always the exact dense layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

DEFAULT_GRID = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Dim:
    """One elastic dimension: ``units`` at width 1.0, each ``unit_size`` features wide."""

    units: int
    unit_size: int = 1
    divisor: int = 1
    elastic: bool = True

    def count(self, width: float) -> int:
        """Features this dimension has at ``width``."""
        if not self.elastic:
            return self.units * self.unit_size
        n = int(self.units * width / self.divisor + 0.5) * self.divisor
        return min(max(self.divisor, n), self.units) * self.unit_size


def fixed(n: int) -> Dim:
    """A dimension that width does not touch (image channels, residual width, classes)."""
    return Dim(n, elastic=False)


def rank_count(rank: float, m: int, n: int) -> int:
    """Components an active ``m x n`` factorized layer keeps at ``rank``."""
    return max(1, math.ceil(rank * min(m, n) - 1e-9))


def _fmt(value: float) -> str:
    return f"{value:g}".replace(".", "p")


@dataclass(frozen=True, order=True)
class Subnet:
    """A member of a family. ``rank`` is None for dense families."""

    width: float = 1.0
    rank: float | None = None

    @property
    def key(self) -> str:
        """A name usable inside state-dict keys, e.g. ``w0p5_r0p25``."""
        return f"w{_fmt(self.width)}" + ("" if self.rank is None else f"_r{_fmt(self.rank)}")

    def to_dict(self) -> dict:
        return {"width": self.width} if self.rank is None else {"width": self.width, "rank": self.rank}

    @classmethod
    def from_dict(cls, d: dict) -> "Subnet":
        return cls(float(d["width"]), None if d.get("rank") is None else float(d["rank"]))

    def __str__(self) -> str:
        return f"width={self.width:g}" + ("" if self.rank is None else f", rank={self.rank:g}")


def grid(widths: Iterable[float], ranks: Iterable[float] | None) -> list[Subnet]:
    """The cartesian product of the width and rank lists, smallest first."""
    rank_list: Sequence[float | None] = [None] if ranks is None else sorted(set(ranks))
    return [Subnet(float(w), None if r is None else float(r)) for w in sorted(set(widths)) for r in rank_list]


def check_fraction(name: str, value: float, upper: float = 1.0) -> float:
    """A width or rank must lie in (0, upper]; anything else is a clear ValueError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, {upper:g}], got {value!r}") from None
    if not (0.0 < value <= upper + 1e-12) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, {upper:g}], got {value:g}")
    return value
