"""Evolutionary search for the best member of a family under a budget (Once-for-All's recipe).

A population of members drawn from the family's layerwise space is scored, the best quarter
kept as parents, and the next generation bred from them: half by mutation (each stage's or
block's width, rank and depth redrawn with a small probability), the rest by crossover (each
group's choices taken from one of two parents). Members over the budget are never scored.
Scores and costs come from callables, so the search knows nothing of data or runtimes: the
caller measures accuracy (``training``) and latency (``export``).

Every choice comes from one seeded generator, so with counted costs (parameters, FLOPs) the
same seed gives the same members, scores and front. Measured latency is noisy, and a member
near the budget may fall on either side of it from one run to the next.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .base import ElasticModel
from .fileio import atomic_path
from .space import Member, Values

COSTS = ("params", "flops", "latency")
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    """An upper bound on one cost: parameters, FLOPs (per example) or latency in ms."""

    kind: str
    limit: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``params=250k``, ``flops=2.5M``, ``latency=1.2`` (milliseconds)."""
        match = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*([kKmMgG]?)\s*", text or "")
        if not match or match.group(1) not in COSTS:
            raise ValueError(f"--budget must be params=N, flops=N or latency=MS (N may end in k, M or G), got {text!r}")
        try:
            limit = float(match.group(2)) * _SUFFIX[match.group(3).lower()]
        except ValueError:
            raise ValueError(f"--budget {text!r}: {match.group(2)!r} is not a number") from None
        if not limit > 0 or math.isinf(limit):
            raise ValueError(f"--budget {text!r} must be a positive number")
        return cls(match.group(1), limit)

    def __str__(self) -> str:
        return (
            f"{self.kind} <= {self.limit:g} ms"
            if self.kind == "latency"
            else f"{self.kind} <= {short_count(self.limit, 6)}"
        )


@dataclass
class Candidate:
    """A scored member: its metric and every cost measured for it."""

    member: Member
    metric: float
    costs: dict[str, float]
    generation: int

    def to_dict(self) -> dict:
        return {"member": self.member.to_dict(), "metric": self.metric, **self.costs, "generation": self.generation}


@dataclass
class SearchResult:
    budget: Budget
    metric: str
    higher_is_better: bool
    candidates: list[Candidate]  # every member scored, in the order scored
    rejected: int  # members drawn over the budget (never scored)
    history: list[float] = field(default_factory=list)  # best metric after each generation

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def ranked(self) -> list[Candidate]:
        """Scored members, best metric first (ties: the cheaper first)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return sorted(self.candidates, key=lambda c: (sign * c.metric, c.costs[self.budget.kind], c.member.key))

    def front(self) -> list[Candidate]:
        """The Pareto front over (budget cost, metric): no other member is as cheap and better."""
        front: list[Candidate] = []
        sign = -1.0 if self.higher_is_better else 1.0  # ties broken as ranked() breaks them
        for c in sorted(self.candidates, key=lambda c: (c.costs[self.budget.kind], sign * c.metric, c.member.key)):
            if not front or self.better(c.metric, front[-1].metric):
                front.append(c)
        return front


class Evolution:
    """The search over one model's space. ``cost(member)`` returns the costs (it must include
    the budget's kind); ``score(member)`` the metric. Both are called at most once per member."""

    def __init__(
        self,
        model: ElasticModel,
        score: Callable[[Member], float],
        cost: Callable[[Member], dict[str, float]],
        budget: Budget,
        *,
        metric: str = "accuracy",
        higher_is_better: bool = True,
        seed: int = 0,
        mutation_prob: float = 0.1,
        parent_ratio: float = 0.25,
        mutation_ratio: float = 0.5,
        progress: Callable[[str], None] | None = None,
    ):
        self.model, self.score, self.cost, self.budget = model, score, cost, budget
        self.generator = torch.Generator().manual_seed(seed)
        self.mutation_prob, self.parent_ratio, self.mutation_ratio = mutation_prob, parent_ratio, mutation_ratio
        self.result = SearchResult(budget, metric, higher_is_better, [], 0)
        self.progress = progress or (lambda text: None)
        self._scored: dict[Member, Candidate] = {}
        self._costs: dict[Member, dict[str, float]] = {}
        self._space = model._space

    # ----- members within budget -------------------------------------------------------------
    def _fits(self, member: Member) -> bool:
        if member not in self._costs:
            self._costs[member] = self.cost(member)
        fits = self._costs[member][self.budget.kind] <= self.budget.limit
        self.result.rejected += not fits
        return fits

    def _draw(self, make: Callable[[], Values], tries: int = 100) -> Member | None:
        """A member from ``make`` that fits the budget (None after ``tries`` attempts)."""
        for _ in range(tries):
            member = self._space.compact(make())
            if self._fits(member):
                return member
        return None

    def _random(self) -> Values:
        return self._space.sample(
            self.generator, self.model.width_choices, self.model.rank_choices, self.model.max_values, layerwise=True
        )

    # ----- breeding ----------------------------------------------------------------------------
    def _mutate(self, parent: Member) -> Values:
        """Each group's choice of each axis redrawn with probability ``mutation_prob``."""
        values = dict(self.model.expand(parent))
        fresh = self._random()
        for axis, genes in values.items():
            if axis == "blocks":
                kept = set(genes)
                middle = list(self.model.max_values["blocks"])[1:-1]
                for block in middle:
                    if self._chance():
                        kept ^= {block}
                values[axis] = tuple(sorted(kept))
            else:
                values[axis] = tuple(new if self._chance() else old for old, new in zip(genes, fresh[axis]))
        return values

    def _crossover(self, a: Member, b: Member) -> Values:
        """Each group's choices from one of the two parents, drawn per group."""
        va, vb = self.model.expand(a), self.model.expand(b)
        values = {}
        for axis in va:
            if axis == "blocks":  # blocks both parents keep stay; the others follow a coin
                both, either = set(va[axis]) & set(vb[axis]), set(va[axis]) | set(vb[axis])
                values[axis] = tuple(sorted(i for i in either if i in both or i in (va if self._coin() else vb)[axis]))
            else:
                values[axis] = tuple(x if self._coin() else y for x, y in zip(va[axis], vb[axis]))
        return values

    def _chance(self) -> bool:
        return float(torch.rand((), generator=self.generator)) < self.mutation_prob

    def _coin(self) -> bool:
        return bool(torch.randint(2, (), generator=self.generator))

    def _pick(self, parents: list[Member]) -> Member:
        return parents[int(torch.randint(len(parents), (), generator=self.generator))]

    def _fill(self, members: list[Member], size: int, make: Callable[[], Values]) -> None:
        """Add new members (within budget, not yet in ``members``) from ``make`` up to ``size``;
        gives up after 20 tries per missing member (a small space may not have enough)."""
        for _ in range(20 * max(0, size - len(members))):
            if len(members) >= size:
                return
            member = self._draw(make, tries=1)
            if member is not None and member not in members:
                members.append(member)

    # ----- the loop ----------------------------------------------------------------------------
    def _evaluate(self, member: Member, generation: int) -> Candidate:
        if member not in self._scored:
            candidate = Candidate(member, float(self.score(member)), dict(self._costs[member]), generation)
            self._scored[member] = candidate
            self.result.candidates.append(candidate)
        return self._scored[member]

    def run(self, population: int = 16, generations: int = 4, seeds: list[Member] = ()) -> SearchResult:
        """Search; ``seeds`` (e.g. the trained uniform members) and the space's smallest member
        join the first population if they fit the budget."""
        if population < 2 or generations < 1:
            raise ValueError(
                f"--population must be at least 2 and --generations at least 1, got {population} and {generations}"
            )
        smallest = self.model.smallest_member()  # under a tight budget random draws rarely fit
        candidates = dict.fromkeys([*(self.model.resolve_member(s) for s in seeds), smallest])
        members = [s for s in candidates if self._fits(s)]
        if smallest not in members:  # checked before the cut to ``population``, which may leave it out
            cost = self._costs[smallest][self.budget.kind]
            raise ValueError(
                f"no member of {self.model.arch} fits the budget {self.budget}: "
                f"the smallest ({smallest}) has {self.budget.kind} {cost:g}"
            )
        members = members[:population]
        self._fill(members, population, self._random)
        n_parents = max(1, int(population * self.parent_ratio))
        n_mutants = int(population * self.mutation_ratio)
        for generation in range(generations):
            scored = [self._evaluate(m, generation) for m in members]
            sign = -1.0 if self.result.higher_is_better else 1.0
            scored.sort(key=lambda c: (sign * c.metric, c.member.key))
            parents = [c.member for c in scored[:n_parents]]
            best = self.result.ranked()[0]
            self.result.history.append(best.metric)
            kind = self.budget.kind
            self.progress(
                f"generation {generation + 1}/{generations}: best {self.result.metric} {best.metric:.4f} "
                f"at {kind} {best.costs[kind]:g} ({len(self.result.candidates)} members scored)"
            )
            if generation == generations - 1:
                break
            children = list(parents)
            self._fill(children, len(parents) + n_mutants, lambda: self._mutate(self._pick(parents)))
            self._fill(children, population, lambda: self._crossover(self._pick(parents), self._pick(parents)))
            members = children
        return self.result


def write_front(path, result: SearchResult, grid: list[Candidate], best: Candidate, record: dict) -> None:
    """``pareto.json``: the front (every member on it with its metric and costs), the uniform
    grid members measured the same way, the chosen member, and ``record`` (how it was run)."""
    report = {
        **record,
        "budget": {"kind": result.budget.kind, "limit": result.budget.limit},
        "metric": result.metric,
        "higher_is_better": result.higher_is_better,
        "scored": len(result.candidates),
        "rejected_over_budget": result.rejected,
        "best_per_generation": result.history,
        "best": best.to_dict(),
        "front": [c.to_dict() for c in result.front()],
        "grid": [c.to_dict() for c in grid],
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def short_count(n: float, digits: int = 3) -> str:
    """A count in plain units: 412345 -> '412k', 2.5e6 -> '2.5M' (``digits`` significant)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g}{unit}"
    return f"{n:.{digits}g}"


ZOOM = 1.6  # the plot shows costs up to this multiple of the budget (or of the front's largest)
LABEL_OFFSETS = [(dx, dy) for dy in (6, -8, 18, -20, 30, -32) for dx in (6, -6)]  # points: right/left, up/down


def plot_front(path, result: SearchResult, grid: list[Candidate], best: Candidate, title: str) -> None:
    """``pareto.png``: :func:`draw_front` written as PNG."""
    import matplotlib.pyplot as plt

    fig = draw_front(result, grid, best, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def draw_front(result: SearchResult, grid: list[Candidate], best: Candidate, title: str):
    """Metric against the budget's cost, zoomed to the budget's neighbourhood: every scored
    member, the front, the uniform grid members (those beyond the zoom drawn at its edge, with
    their cost) and the budget; costs in plain units (k, M), labels placed apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    kind = result.budget.kind
    unit = {"params": "parameters", "flops": "FLOPs per example", "latency": "latency at batch 1 (ms)"}[kind]
    front = result.front()
    right = ZOOM * max([result.budget.limit, best.costs[kind], *(c.costs[kind] for c in front)])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = [c for c in result.candidates if c.costs[kind] <= right]
    ax.scatter([c.costs[kind] for c in shown], [c.metric for c in shown], s=12, color="0.75", label="scored members")
    ax.plot(
        [c.costs[kind] for c in front], [c.metric for c in front], "o-", color="tab:blue", label="front found by search"
    )
    measured = [c for c in grid if kind in c.costs]
    inside = [c for c in measured if c.costs[kind] <= right]
    beyond = [c for c in measured if c.costs[kind] > right]
    ax.scatter([c.costs[kind] for c in inside], [c.metric for c in inside], marker="X", s=70, color="tab:red",
               label="uniform members", zorder=3)  # fmt: skip
    edge = 0.985 * right
    if beyond:
        ax.scatter([edge] * len(beyond), [c.metric for c in beyond], marker=">", s=60, color="tab:red", zorder=3,
                   label="uniform members beyond the zoom")  # fmt: skip
    ax.scatter([best.costs[kind]], [best.metric], marker="*", s=180, color="tab:green", label="chosen", zorder=4)
    ax.axvline(result.budget.limit, color="0.3", linestyle="--", linewidth=1, label=f"budget {result.budget}")
    metrics = [c.metric for c in shown + inside + beyond + [best]]
    low, high = min(metrics), max(metrics)
    pad = 0.08 * (high - low or abs(high) or 1.0)
    ax.set_xlim(0, right)
    ax.set_ylim(low - pad, high + pad)
    if kind != "latency":
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_count(x)))
    ax.set_xlabel(unit)
    ax.set_ylabel(
        result.metric.replace("_", " ") + (" (higher is better)" if result.higher_is_better else " (lower is better)")
    )
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if result.higher_is_better else "upper right")
    fig.tight_layout()

    def cost_text(c: Candidate) -> str:
        return f"{c.costs[kind]:.3g} ms" if kind == "latency" else short_count(c.costs[kind])

    def name(c: Candidate) -> str:
        return f"w={c.member.width:g}" + ("" if c.member.rank is None else f" r={c.member.rank:g}")

    points = [(c.costs[kind], c.metric) for c in inside] + [(edge, c.metric) for c in beyond]
    labels = [name(c) for c in inside] + [f"{name(c)} ({cost_text(c)})" for c in beyond]
    markers = points + [(best.costs[kind], best.metric)] + [(c.costs[kind], c.metric) for c in front]
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    place_labels(fig, ax, points, labels, offsets=LABEL_OFFSETS, markers=markers, marker_radius=7, padding=3,
                 obstacles=[legend], color="tab:red")  # fmt: skip
    return fig


def place_labels(
    fig, ax, points, labels, *, offsets, markers, marker_radius: float, padding: float, obstacles=(), **style
) -> None:
    """Annotate each point at the first of ``offsets`` (points) where its label overlaps no placed
    label, no marker box (``marker_radius`` pixels around each of ``markers``) and no ``obstacles``
    and stays inside the axes; else at the offset that overlaps least. ``style``: the text's."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)

    def overlap(a, b) -> float:
        return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))

    taken = list(obstacles)
    for x, y in markers:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox([[px - marker_radius, py - marker_radius], [px + marker_radius, py + marker_radius]]))
    for (x, y), text in zip(points, labels):
        chosen, chosen_cost, chosen_box = None, None, None
        for dx, dy in offsets:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top", **style)  # fmt: skip
            box = note.get_window_extent(renderer).padded(padding)  # a little air between labels
            outside = box.width * box.height - overlap(box, frame)
            cost = sum(overlap(box, other) for other in taken) + 10 * outside
            if chosen_cost is None or cost < chosen_cost:
                if chosen is not None:
                    chosen.remove()
                chosen, chosen_cost, chosen_box = note, cost, box
            else:
                note.remove()
            if cost == 0:
                break
        taken.append(chosen_box)
