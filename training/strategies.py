"""Training strategies: which members of the family each step trains.

A strategy is a small object with one method, ``plan(step) -> list[Pass]``: the members the
step trains, in order. The trainer runs each pass's forward and backward, sums the gradients
and takes one optimizer step masked to the union of the trained members (see
:mod:`training.masking`). Random choices come from the strategy's own seeded generator, so
every process of a distributed run chooses the same members, and a resumed run (which
restores the generator from its checkpoint) chooses what the uninterrupted run would have.

* ``alternating``: the paper's schedule (Mohtashami, Jaggi, Stich 2022): consecutive steps
  switch between the full network and a core. A fraction ``core_prob`` of the steps, spread
  evenly, are core steps (0.5: full, core, full, core, ...); with several cores a core step
  picks one at random.
* ``sandwich``: the sandwich rule with in-place distillation (Universally Slimmable Networks):
  each step trains the largest member on the labels, then the smallest and ``num_random``
  random other members on the largest one's detached soft outputs.
* ``all``: every member each step (MatFormer).
* ``random``: one member, sampled uniformly, per step (Once-for-All, whittle).
* ``separate``: one member trained alone; the baseline every comparison needs.

``random`` and ``sandwich`` draw from the trained members (``space="uniform"``, the default)
or from the family's whole space (``space="layerwise"``, Once-for-All): each stage's or
block's width, rank and depth drawn independently, so members off the diagonal are trained
too, and the bottom of the sandwich is the narrowest and shallowest member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

import zoo
from zoo import Member
from zoo.space import DEFAULT_GRID, check_fraction, grid

from .flags import non_negative

STRATEGIES = ("alternating", "sandwich", "all", "random", "separate")
SPACES = ("uniform", "layerwise")
SAMPLING = ("random", "sandwich")  # the strategies that draw members, and so take a space


class LayerwiseSpace:
    """Members drawn from a family's whole space: per stage or block, the width (and rank) from
    the trained widths (ranks) and the depth from 1 to full, independently."""

    def __init__(self, model: zoo.ElasticModel):
        self.model = model
        self.smallest = model.smallest_member(layerwise=True)

    def sample(self, generator: torch.Generator) -> Member:
        return self.model.resolve_member(self.model.sample_member(generator, layerwise=True))


@dataclass(frozen=True)
class Pass:
    """One forward/backward of a step. ``distill``: learn from the step's first pass's soft
    outputs rather than the labels (the first pass is then the largest member)."""

    member: Member
    distill: bool = False


class Strategy:
    """Chooses the passes of every step from ``members`` (sorted smallest first)."""

    name: ClassVar[str]

    def __init__(self, members: Sequence[Member], largest: Member, seed: int):
        self.members = list(members)
        self.largest = largest
        self.generator = torch.Generator().manual_seed(seed)

    def plan(self, step: int) -> list[Pass]:
        raise NotImplementedError

    def _pick(self, choices: Sequence[Member]) -> Member:
        return choices[int(torch.randint(len(choices), (1,), generator=self.generator))]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class Alternating(Strategy):
    name = "alternating"

    def __init__(self, members: Sequence[Member], largest: Member, seed: int, core_prob: float = 0.5):
        super().__init__(members, largest, seed)
        if not 0.0 < core_prob < 1.0:
            raise ValueError(f"--core-prob must be in (0, 1), got {core_prob:g}")
        self.core_prob = core_prob
        self.cores = [s for s in self.members if s != largest]
        if not self.cores:
            raise ValueError("the alternating strategy needs a core: give a --width or --rank below the largest")

    def is_core_step(self, step: int) -> bool:
        """Step ``t`` is a core step when ``floor((t+1)p)`` passes an integer: exactly a
        fraction ``p`` of the steps, spread evenly."""
        return math.floor((step + 1) * self.core_prob + 1e-9) > math.floor(step * self.core_prob + 1e-9)

    def plan(self, step: int) -> list[Pass]:
        return [Pass(self._pick(self.cores) if self.is_core_step(step) else self.largest)]


class Sandwich(Strategy):
    name = "sandwich"

    def __init__(
        self,
        members: Sequence[Member],
        largest: Member,
        seed: int,
        num_random: int = 2,
        space: LayerwiseSpace | None = None,
    ):
        super().__init__(members, largest, seed)
        if num_random < 0:
            raise ValueError(f"--num-random must be >= 0, got {num_random}")
        if len(self.members) < 2 and space is None:
            raise ValueError("the sandwich strategy needs at least two members (a --width or --rank below the largest)")
        self.num_random, self.space = num_random, space
        self.smallest = self.members[0] if space is None else space.smallest
        self.middle = [s for s in self.members if s not in (largest, self.smallest)]

    def plan(self, step: int) -> list[Pass]:
        if self.space is not None:
            chosen = [self.space.sample(self.generator) for _ in range(self.num_random)]
        else:
            order = torch.randperm(len(self.middle), generator=self.generator)[: self.num_random].tolist()
            chosen = [self.middle[i] for i in sorted(order)]
        return [Pass(self.largest), Pass(self.smallest, distill=True), *[Pass(s, distill=True) for s in chosen]]


class All(Strategy):
    name = "all"

    def plan(self, step: int) -> list[Pass]:
        return [Pass(s) for s in reversed(self.members)]


class Random(Strategy):
    name = "random"

    def __init__(self, members: Sequence[Member], largest: Member, seed: int, space: LayerwiseSpace | None = None):
        super().__init__(members, largest, seed)
        self.space = space

    def plan(self, step: int) -> list[Pass]:
        return [Pass(self._pick(self.members) if self.space is None else self.space.sample(self.generator))]


class Separate(Strategy):
    name = "separate"

    def __init__(self, members: Sequence[Member], largest: Member, seed: int):
        super().__init__(members, largest, seed)
        if len(self.members) != 1:
            raise ValueError(
                f"the separate strategy trains exactly one member, got {len(self.members)} "
                f"({'; '.join(str(s) for s in self.members)}); give one --width (and one --rank)"
            )

    def plan(self, step: int) -> list[Pass]:
        return [Pass(self.members[0])]


_CLASSES = {cls.name: cls for cls in (Alternating, Sandwich, All, Random, Separate)}


def members_for(
    strategy: str,
    widths: Sequence[float],
    ranks: Sequence[float] | None,
    model: zoo.ElasticModel,
    extra: Sequence[dict] = (),
) -> list[Member]:
    """The trained members: the product of the width and rank lists plus the ``extra`` members
    (any structure), validated against ``model`` and sorted smallest first; joint strategies
    also train the largest member (the full model)."""
    if strategy not in _CLASSES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    members = {model.resolve_member(s) for s in [*grid(widths, ranks), *extra]}
    if strategy != "separate":
        members.add(model.largest)
    return model.sort_members(members)


def create_strategy(
    name: str,
    members: Sequence[Member],
    largest: Member,
    seed: int,
    *,
    core_prob: float = 0.5,
    num_random: int = 2,
    space: LayerwiseSpace | None = None,
) -> Strategy:
    """Build a strategy by name; its generator is seeded from ``seed`` alone. ``space``: draw
    from the layerwise space (``random`` and ``sandwich`` only)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if space is not None and name not in SAMPLING:
        raise ValueError(
            f"--space layerwise applies to the strategies that draw members ({', '.join(SAMPLING)}), not {name}"
        )
    options = {
        "alternating": {"core_prob": core_prob},
        "sandwich": {"num_random": num_random, "space": space},
        "random": {"space": space},
    }.get(name, {})
    return _CLASSES[name](members, largest, seed, **options)


@dataclass
class MemberConfig:
    """Which members a run trains and how each step chooses among them (``zoo train``'s member flags)."""

    strategy: str = "alternating"
    widths: list[float] | None = None  # default: 0.25, 0.5, 0.75, 1 (dense); 1 (low-rank)
    ranks: list[float] | None = None  # default with --low-rank: 0.25, 0.5, 0.75, 1
    extra_members: list[dict] | None = None  # --member: members of any structure, trained too
    space: str = "uniform"  # random/sandwich draw from the trained members, or "layerwise"
    low_rank: bool = False
    core_prob: float = 0.5
    num_random: int = 2

    def check_flags(self) -> None:
        """What needs no model: names, fractions, combinations."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        non_negative(self, "num_random")
        for w in self.widths or []:
            check_fraction("--width", w)
        if self.ranks and not self.low_rank:
            raise ValueError("--rank needs --low-rank (the dense family has no rank axis)")
        for r in self.ranks or []:
            check_fraction("--rank", r)
        if self.space not in SPACES:
            raise ValueError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}")

    def member_lists(self) -> tuple[list[float], list[float] | None]:
        """The width and rank lists whose product (plus the largest member) is trained.

        Defaults: every width of the grid (dense) or every rank at width 1 (low-rank); for the
        separate baseline, the full value of each axis not given.
        """
        if self.extra_members and not self.widths and not self.ranks:
            return [], ([] if self.low_rank else None)  # only the given members (and the largest)
        if self.strategy == "separate":
            return self.widths or [1.0], ((self.ranks or [1.0]) if self.low_rank else None)
        widths = self.widths or ([1.0] if self.low_rank else list(DEFAULT_GRID))
        return widths, ((self.ranks or list(DEFAULT_GRID)) if self.low_rank else None)

    def members(self, model: zoo.ElasticModel) -> list[Member]:
        """The trained members, validated against ``model`` (its structure is enough)."""
        return members_for(self.strategy, *self.member_lists(), model, self.extra_members or ())

    def create(self, model: zoo.ElasticModel, members: Sequence[Member], seed: int) -> Strategy:
        """The strategy over ``members``; refuses combinations that do not apply."""
        space = LayerwiseSpace(model) if self.space == "layerwise" else None
        options = dict(core_prob=self.core_prob, num_random=self.num_random, space=space)
        return create_strategy(self.strategy, members, model.largest, seed, **options)
