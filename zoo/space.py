"""Members as data: a member is a JSON-ready choice per stage (CNNs) or per block (Transformers).

A family's space (:class:`Space`) has *groups*, its stages or blocks, and axes:

* width axes, a fraction in (0, 1] per group: ``width`` for CNNs (every channel count of the
  stage), ``heads`` and ``mlp`` for Transformers (attention heads, MLP hidden units; the
  residual width stays fixed, as in MatFormer);
* ``rank`` (low-rank families), a fraction in (0, 1] per group: every factorized layer of the
  group keeps that fraction of its components;
* depth: ``depth`` for CNNs, the blocks each stage keeps (its first d; the first always stays),
  ``blocks`` for Transformers, the indices of the blocks kept (Gemma 3n skips middle blocks).

A member gives each axis either one value (every group) or a list (one per group). The uniform
``Member(width=0.5, rank=0.25)`` is that rule applied to every axis: one point of the same
space, resolved by the same code. ``width`` is the shorthand for all width axes. Canonical
members (what :meth:`Space.compact` returns, and what models, files and metrics hold) write an
axis as one number when its groups agree and leave out full depth, so a uniform member reads
``{"width": 0.5}`` and keeps the name it always had.

Rounding (the same everywhere, so a sliced model matches its elastic twin):

* channels: ``round(n * width / divisor) * divisor``, at least ``divisor`` and at most ``n``
  (half rounds up). CIFAR ResNets use divisor 4, ImageNet ResNets, MobileNetV2 and the ViT's
  MLP 8; the family argument ``round_channels`` sets another (:func:`channel_divisor`), e.g. a
  multiple the device's kernels run well, and is recorded with the model's arguments.
* attention heads: ``round(heads * width)``, at least 1 (divisor 1, half up). The head
  dimension is fixed, so ``slim_vit_tiny`` (3 heads) runs 1, 2, 2, 3 heads at widths
  0.25, 0.5, 0.75, 1.0.
* rank: a factorized ``m x n`` layer at active size keeps ``ceil(rank * min(m, n))``
  components (at least 1), counted on the layer's *active* shape, so width and rank compose
  and rank 1.0 is always the exact dense layer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

DEFAULT_GRID = (0.25, 0.5, 0.75, 1.0)
INTEGER_AXES = ("depth", "blocks")

Values = dict[str, tuple]  # a member expanded: axis -> one value per group (blocks: kept indices)


@dataclass(frozen=True)
class Dim:
    """One elastic dimension: ``units`` at width 1.0, each ``unit_size`` features wide.

    ``axis`` and ``group`` say which of a member's values sizes it (e.g. ``("width", 2)``:
    the width of stage 2).
    """

    units: int
    unit_size: int = 1
    divisor: int = 1
    elastic: bool = True
    axis: str = "width"
    group: int = 0

    def count(self, width: float) -> int:
        """Features this dimension has at ``width``."""
        if not self.elastic:
            return self.units * self.unit_size
        n = int(self.units * width / self.divisor + 0.5) * self.divisor
        return min(max(self.divisor, n), self.units) * self.unit_size

    def count_in(self, values: Values) -> int:
        """Features this dimension has in the expanded member ``values``."""
        return self.count(values[self.axis][self.group]) if self.elastic else self.units * self.unit_size


def channel_divisor(round_channels: int | None, default: int) -> int:
    """The divisor channel counts round to: ``round_channels`` when given, else the family's."""
    if round_channels is None:
        return default
    if isinstance(round_channels, bool) or not isinstance(round_channels, int) or round_channels < 1:
        raise ValueError(f"round_channels must be a positive integer, got {round_channels!r}")
    return round_channels


def fixed(n: int) -> Dim:
    """A dimension that no member changes (image channels, residual width, classes)."""
    return Dim(n, elastic=False)


def rank_count(rank: float, m: int, n: int) -> int:
    """Components an active ``m x n`` factorized layer keeps at ``rank``."""
    return max(1, math.ceil(rank * min(m, n) - 1e-9))


def _fmt(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def _freeze(axis: str, value):
    """JSON values to hashable ones: lists become tuples, numbers floats (ints on depth axes)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(axis, v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"member field {axis!r} takes numbers or a list of numbers, got {value!r}")
    if axis in INTEGER_AXES:
        return int(value) if float(value).is_integer() else float(value)
    return float(value)


class Member:
    """A member of a family: ``Member(width=0.5)``, ``Member(width=[0.5, 1, 1], depth=[1, 2, 3])``.

    Each axis holds one number (every group) or a list (one per group); an axis left out means
    the largest. Only a model's :meth:`~zoo.ElasticModel.resolve_member` knows the groups, so
    members compare equal when written the same way: compare canonical ones (resolved).
    """

    __slots__ = ("_choices",)

    def __init__(self, width=None, rank=None, **axes):
        given = {"width": width, "rank": rank, **axes}
        self._choices = tuple(sorted((k, _freeze(k, v)) for k, v in given.items() if v is not None))

    @classmethod
    def from_dict(cls, d: Mapping) -> "Member":
        """A member from its JSON form (a dict of axis -> number or list)."""
        if not isinstance(d, Mapping):
            raise ValueError(f'a member is a JSON object such as {{"width": 0.5}}, got {d!r}')
        return cls(**{str(k): v for k, v in d.items()})

    def get(self, axis: str, default=None):
        return dict(self._choices).get(axis, default)

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self._choices)

    @property
    def width(self) -> float | None:
        """The one width of a member uniform in width, else None."""
        value = self.get("width")
        return value if isinstance(value, float) else None

    @property
    def rank(self) -> float | None:
        """The one rank of a member uniform in rank (None on dense families or per group)."""
        value = self.get("rank")
        return value if isinstance(value, float) else None

    @property
    def is_uniform(self) -> bool:
        """True for the shorthand members: one width (and one rank), full depth."""
        return set(self.axes) <= {"width", "rank"} and all(not isinstance(v, tuple) for _, v in self._choices)

    @property
    def key(self) -> str:
        """A name usable inside state-dict keys: ``w0p5_r0p25`` for uniform members, a short
        digest of the JSON form for the others."""
        if self.is_uniform:
            return f"w{_fmt(self.width or 1.0)}" + ("" if self.rank is None else f"_r{_fmt(self.rank)}")
        return "m" + hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._choices}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Member) and self._choices == other._choices

    def __hash__(self) -> int:
        return hash(self._choices)

    def __repr__(self) -> str:
        return f"Member({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __str__(self) -> str:
        def show(v):
            return (
                f"{v:g}"
                if isinstance(v, float)
                else (str(v) if isinstance(v, int) else "[" + ",".join(f"{x:g}" for x in v) + "]")
            )

        return ", ".join(f"{k}={show(v)}" for k, v in self._choices) or "largest"


def grid(widths: Iterable[float], ranks: Iterable[float] | None) -> list[Member]:
    """The uniform members of the product of the width and rank lists, smallest first."""
    rank_list: Sequence[float | None] = [None] if ranks is None else sorted(set(ranks))
    return [Member(float(w), None if r is None else float(r)) for w in sorted(set(widths)) for r in rank_list]


def check_fraction(name: str, value: float, upper: float = 1.0) -> float:
    """A width or rank must lie in (0, upper]; anything else is a clear ValueError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, {upper:g}], got {value!r}") from None
    if not (0.0 < value <= upper + 1e-12) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, {upper:g}], got {value:g}")
    return value


@dataclass(frozen=True)
class Space:
    """The structure of a family's choices: its groups and which axes they have.

    ``width_axes``: ``("width",)`` for CNNs, ``("heads", "mlp")`` for Transformers.
    ``depths``: CNNs, the blocks of each stage (axis ``depth``); Transformers leave it None and
    have the ``blocks`` axis instead (``skip_blocks``).
    """

    group: str  # "stage" or "block"
    groups: int
    width_axes: tuple[str, ...]
    low_rank: bool = False
    depths: tuple[int, ...] | None = None
    skip_blocks: bool = False

    @property
    def axes(self) -> tuple[str, ...]:
        depth = ("depth",) if self.depths else (("blocks",) if self.skip_blocks else ())
        return (*self.width_axes, *(("rank",) if self.low_rank else ()), *depth)

    def full(self) -> Values:
        """The largest member of the family, expanded."""
        values: Values = {a: (1.0,) * self.groups for a in self.width_axes}
        if self.low_rank:
            values["rank"] = (1.0,) * self.groups
        if self.depths:
            values["depth"] = tuple(self.depths)
        if self.skip_blocks:
            values["blocks"] = tuple(range(self.groups))
        return values

    def expand(self, member: Member, limit: Values, name: str = "model") -> Values:
        """Every axis of ``member`` as one value per group, validated against ``limit`` (the
        largest member the model physically holds). Errors name the field and what it allows."""
        choices = dict(member._choices)
        unknown = sorted(set(choices) - set(self.axes) - {"width"})
        if unknown:
            if "rank" in unknown:
                raise ValueError(f"{name} is built dense and has no rank axis (create it with low_rank=True)")
            fields = ", ".join(dict.fromkeys(("width", *self.axes)))
            raise ValueError(f"{name} has member fields {fields}; unknown field {', '.join(unknown)}")
        given = {}  # axis -> the field the user wrote, so errors name what they wrote
        if "width" in choices and self.width_axes != ("width",):
            both = [a for a in self.width_axes if a in choices]
            if both:
                raise ValueError(
                    f"{name}: give width (all of {', '.join(self.width_axes)}) or {', '.join(both)}, not both"
                )
            for a in self.width_axes:
                choices[a], given[a] = choices["width"], "width"
            del choices["width"]
        values = dict(limit)
        for axis, value in choices.items():
            field = given.get(axis, axis)
            if axis == "blocks":
                values[axis] = self._blocks(value, limit[axis], name)
            elif axis == "depth":
                values[axis] = tuple(
                    self._depth(g, d, most, name)
                    for g, (d, most) in enumerate(zip(self._per_group(axis, value, name), limit[axis]))
                )
            elif not isinstance(value, tuple):
                values[axis] = (check_fraction(f"{name}: {field}", value, min(limit[axis])),) * self.groups
            else:
                per_group = self._per_group(axis, value, name)
                values[axis] = tuple(
                    check_fraction(f"{name}: {field} of {self.group} {g}", v, most)
                    for g, (v, most) in enumerate(zip(per_group, limit[axis]))
                )
        return values

    def _depth(self, g: int, d, most: int, name: str) -> int:
        if not isinstance(d, int) or not 1 <= d <= most:
            raise ValueError(f"{name}: depth of {self.group} {g} must be an integer in [1, {most}], got {d!r}")
        return d

    def _per_group(self, axis: str, value, name: str) -> tuple:
        if not isinstance(value, tuple):
            return (value,) * self.groups
        if len(value) != self.groups:
            raise ValueError(
                f"{name}: {axis} takes one value or a list of {self.groups} (one per {self.group}), got {len(value)}"
            )
        return value

    def _blocks(self, value, limit: tuple, name: str) -> tuple:
        kept = value if isinstance(value, tuple) else ()  # a list even for one block: [5], not 5
        if (
            not kept
            or any(not isinstance(i, int) for i in kept)
            or list(kept) != sorted(set(kept))
            or not set(kept) <= set(limit)
        ):
            given = list(value) if isinstance(value, tuple) else value
            raise ValueError(
                f"{name}: blocks must be a non-empty increasing list of block indices from {list(limit)}, got {given}"
            )
        return tuple(kept)

    def compact(self, values: Values) -> Member:
        """The canonical member of expanded ``values``: one number per axis whose groups agree,
        ``width`` when all width axes agree, full depth left out."""
        out: dict = {}
        widths = {v for a in self.width_axes for v in values[a]}
        if len(widths) == 1:
            out["width"] = widths.pop()
        else:
            out.update({a: _one_or_list(values[a]) for a in self.width_axes})
        if self.low_rank:
            out["rank"] = _one_or_list(values["rank"])
        if self.depths and tuple(values["depth"]) != tuple(self.depths):
            out["depth"] = list(values["depth"])
        if self.skip_blocks and tuple(values["blocks"]) != tuple(range(self.groups)):
            out["blocks"] = list(values["blocks"])
        return Member.from_dict(out)

    def size_key(self, values: Values) -> tuple[float, float, float]:
        """Orders members smallest first: mean width, then mean rank, then depth."""
        widths = [v for a in self.width_axes for v in values[a]]
        rank = sum(values["rank"]) / self.groups if self.low_rank else 0.0
        depth = sum(values["depth"]) if self.depths else (len(values["blocks"]) if self.skip_blocks else 0)
        return (sum(widths) / len(widths), rank, float(depth))

    def sample(
        self,
        generator: torch.Generator,
        widths: Sequence[float],
        ranks: Sequence[float] | None,
        limit: Values,
        layerwise: bool = True,
    ) -> Values:
        """A random member: each group's width (and rank) drawn from ``widths`` (``ranks``),
        each stage's depth from 1 to its limit, and for Transformers a random set of middle
        blocks skipped (at most half). ``layerwise=False`` draws one width and rank for all
        groups and keeps full depth (the uniform space)."""

        def pick(options: Sequence) -> object:
            return options[int(torch.randint(len(options), (1,), generator=generator))]

        def draw(axis: str, options: Sequence[float]) -> tuple:
            if layerwise:
                return tuple(min(pick(options), most) for most in limit[axis])
            one = pick(options)
            return tuple(min(one, most) for most in limit[axis])

        values = dict(limit)
        if layerwise:
            values.update({axis: draw(axis, widths) for axis in self.width_axes})
        else:
            one = pick(widths)
            values.update({axis: tuple(min(one, most) for most in limit[axis]) for axis in self.width_axes})
        if self.low_rank and ranks:
            values["rank"] = draw("rank", ranks)
        if layerwise and self.depths:
            values["depth"] = tuple(1 + int(torch.randint(most, (1,), generator=generator)) for most in limit["depth"])
        if layerwise and self.skip_blocks:
            kept = list(limit["blocks"])
            middle = kept[1:-1]
            drop = int(torch.randint(len(middle) // 2 + 1, (1,), generator=generator)) if middle else 0
            order = torch.randperm(len(middle), generator=generator)[:drop].tolist()
            values["blocks"] = tuple(b for b in kept if b not in {middle[i] for i in order})
        return values

    def smallest(
        self, widths: Sequence[float], ranks: Sequence[float] | None, limit: Values, layerwise: bool = True
    ) -> Values:
        """The smallest member that :meth:`sample` can draw: narrowest, lowest rank, and (for
        the layerwise space) shallowest."""
        values = dict(limit)
        for axis in self.width_axes:
            values[axis] = tuple(min(min(widths), most) for most in limit[axis])
        if self.low_rank and ranks:
            values["rank"] = tuple(min(min(ranks), most) for most in limit["rank"])
        if layerwise and self.depths:
            values["depth"] = (1,) * self.groups
        if layerwise and self.skip_blocks:
            kept = list(limit["blocks"])
            middle = kept[1:-1]
            dropped = set(middle[: len(middle) // 2])
            values["blocks"] = tuple(b for b in kept if b not in dropped)
        return values

    def describe(self, limit: Values, widths: Sequence[float], ranks: Sequence[float] | None) -> dict:
        """The choices, JSON-ready: per axis, what one group may take and the limits."""
        axes: dict = {}
        for axis in self.width_axes:
            axes[axis] = {"per": self.group, "range": "(0, max]", "max": list(limit[axis]), "values": list(widths)}
        if self.low_rank:
            axes["rank"] = {
                "per": self.group,
                "range": "(0, max]",
                "max": list(limit["rank"]),
                "values": list(ranks or []),
            }
        if self.depths:
            axes["depth"] = {
                "per": self.group,
                "min": 1,
                "max": list(limit["depth"]),
                "note": "a stage keeps its first d blocks",
            }
        if self.skip_blocks:
            axes["blocks"] = {"kept_from": list(limit["blocks"]), "note": "increasing block indices to keep"}
        shorthand = "width: one number for " + ", ".join(self.width_axes) + " of every " + self.group
        return {"groups": self.groups, "group": self.group, "axes": axes, "shorthand": shorthand}


def contains(big: Values, small: Values) -> bool:
    """Whether the member ``big`` contains ``small`` (both expanded): every value at least as
    large, every block ``small`` keeps kept too. Such a member cannot be cheaper to run."""
    for axis, values in small.items():
        if axis == "blocks":
            if not set(values) <= set(big[axis]):
                return False
        elif any(s > b for s, b in zip(values, big[axis])):
            return False
    return True


SLOWER_TOLERANCE = 0.05  # measured latency differs this much between repeats of a shared machine


def slower_containers(model, latency: Mapping[Member, float], tolerance: float = SLOWER_TOLERANCE) -> list[tuple]:
    """ "Smaller is never slower", checked: every ``(member, container, member_ms, container_ms)``
    where ``member`` took more than ``1 + tolerance`` times as long as a member that contains it
    (``model.expand`` expands them), slowest excess first."""
    expanded = {member: model.expand(member) for member in latency}
    found = [
        (small, big, latency[small], latency[big])
        for small, values in expanded.items()
        for big, big_values in expanded.items()
        if small != big and latency[small] > (1 + tolerance) * latency[big] and contains(big_values, values)
    ]
    return sorted(found, key=lambda f: (-f[2] / f[3], f[0].key, f[1].key))


def _one_or_list(values: tuple):
    return values[0] if len(set(values)) == 1 else list(values)
