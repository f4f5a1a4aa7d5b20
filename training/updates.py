"""Update policies: the paper's general rule, ``x_{t+1} = x_t - lr · m_t ⊙ g(x_t + δ_t)``.

Mohtashami, Jaggi and Stich (2022) show that plain SGD, dropout, meProp, extragradient, SAM,
independent subnet training and training a core are all one rule with different choices of a
mask ``m_t`` (which coordinates move) and a perturbation ``δ_t`` (where the gradient is taken).
An :class:`UpdatePolicy` makes those two choices; :func:`partial_gradient` applies them:
perturb, take the gradient at ``x + δ``, restore ``x`` exactly, and return ``m``, which the
trainer hands to :func:`training.masking.masked_step`.

The strategies' member steps are this rule too: a member's pass evaluates the core alone
(``set_member`` slices the weights, which is ``δ = -(1 - m) ⊙ x`` computed as a slice) and the
step's mask is the union of the members' regions. A policy composes with that: its ``δ`` is
added on top, and its mask narrows the members' (:func:`intersect`).

Random choices come from the policy's own seeded generator, checkpointed with the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from zoo.layers import ElasticBatchNorm2d, ElasticConv2d, ElasticLayer, ElasticLinear
from zoo.space import Dim

from .masking import Masks

UPDATES = ("full", "sam", "extragradient", "meprop", "unit-dropout", "rank-dropout")
Moves = dict[nn.Parameter, torch.Tensor]  # δ per parameter; parameters not in it do not move
Gradient = Callable[[], list[torch.Tensor]]  # forward and backward at the current weights; the losses


class UpdatePolicy:
    """Chooses ``δ_t`` (:meth:`perturbation`) and ``m_t`` (:meth:`mask`) of one step.

    ``extra_passes``: forward/backward passes per step beyond the step's own (its cost).
    ``distorts_statistics``: the perturbation changes batch-norm statistics, so they are
    recalibrated before periodic evaluations.
    """

    name: ClassVar[str] = "full"
    extra_passes: ClassVar[int] = 0
    distorts_statistics: ClassVar[bool] = False

    def __init__(self, model: nn.Module, seed: int):
        self.params = [p for p in model.parameters() if p.requires_grad]
        # draws come from the CPU (device="cpu" below), whatever torch's default device: the same
        # stream on every device, and a state that resumes anywhere
        self.generator = torch.Generator().manual_seed(seed)

    def perturbation(self, gradient: Gradient, members: Masks | None) -> Moves:
        """``δ_t`` for the weights as they are now (plain SGD: none)."""
        return {}

    def mask(self, members: Masks | None) -> Masks | None:
        """``m_t``, once ``g(x + δ)`` is in ``.grad``: by default the members' own mask."""
        return members

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _gradient_at_x(self, gradient: Gradient) -> list[torch.Tensor | None]:
        """``g(x)`` by one extra forward/backward, taken out of ``.grad``."""
        gradient()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return grads


class SAM(UpdatePolicy):
    """Sharpness-aware minimization (Foret et al., ICLR 2021): ``δ = ρ · g(x) / ‖g(x)‖``."""

    name = "sam"
    extra_passes = 1

    def __init__(self, model: nn.Module, seed: int, rho: float = 0.05):
        super().__init__(model, seed)
        self.rho = rho

    def perturbation(self, gradient: Gradient, members: Masks | None) -> Moves:
        grads = self._gradient_at_x(gradient)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
        scale = self.rho / (norm + 1e-12)
        return {p: g * scale for p, g in zip(self.params, grads) if g is not None}


class Extragradient(UpdatePolicy):
    """Extragradient (Korpelevich 1976): the gradient at the look-ahead ``δ = -η · g(x)``."""

    name = "extragradient"
    extra_passes = 1

    def __init__(self, model: nn.Module, seed: int, eg_lr: float = 0.01):
        super().__init__(model, seed)
        self.eg_lr = eg_lr

    def perturbation(self, gradient: Gradient, members: Masks | None) -> Moves:
        grads = self._gradient_at_x(gradient)
        return {p: g * -self.eg_lr for p, g in zip(self.params, grads) if g is not None}


class MeProp(UpdatePolicy):
    """meProp (Sun et al., ICML 2017) in the rule's form: ``m`` keeps the ``keep`` fraction of
    each tensor's gradient coordinates largest in magnitude (``units``: of its output units,
    rows ranked by gradient norm), within the members' region. The backward is not sparsified,
    so this saves no compute; it is the update meProp makes."""

    name = "meprop"

    def __init__(self, model: nn.Module, seed: int, keep: float = 0.1, units: bool = False):
        super().__init__(model, seed)
        self.keep, self.units = keep, units

    def mask(self, members: Masks | None) -> Masks | None:
        masks: Masks = {}
        for p in self.params:
            if p.grad is None:
                continue
            region = members.get(p) if members else None
            region = torch.ones_like(p, dtype=torch.bool) if region is None else region
            if self.units and p.dim() > 1:
                score = p.grad.detach().flatten(1).norm(dim=1)
                rows = region.flatten(1).any(dim=1)
                chosen = _top(score, rows, self.keep)
                masks[p] = chosen.view(-1, *[1] * (p.dim() - 1)) & region
            else:
                masks[p] = _top(p.grad.detach().abs().flatten(), region.flatten(), self.keep).view_as(p)
        return intersect(members, masks)


def _top(score: torch.Tensor, allowed: torch.Tensor, keep: float) -> torch.Tensor:
    """A bool vector: the ``keep`` fraction (at least one) of the allowed entries with the
    largest scores."""
    k = max(1, int(keep * int(allowed.sum()) + 0.5))
    ranked = torch.where(allowed, score.float(), torch.tensor(-math.inf))
    chosen = torch.zeros_like(allowed)
    chosen[ranked.topk(k).indices] = True
    return chosen


class _Structured(UpdatePolicy):
    """A random structured sub-network per step: ``m`` its parameters, ``δ = -(1 - m) ⊙ x``
    (the dropped part evaluated as zero), drawn together in :meth:`perturbation`."""

    distorts_statistics = True

    def __init__(self, model: nn.Module, seed: int):
        super().__init__(model, seed)
        self.drawn: Masks = {}

    def draw(self) -> Masks:
        raise NotImplementedError

    def perturbation(self, gradient: Gradient, members: Masks | None) -> Moves:
        self.drawn = self.draw()
        return {p: torch.where(m, torch.zeros_like(p), -p.detach()) for p, m in self.drawn.items()}

    def mask(self, members: Masks | None) -> Masks | None:
        return intersect(members, self.drawn)


class UnitDropout(_Structured):
    """Structured dropout of units (independent subnet training, Yuan et al. 2022; federated
    dropout, Caldas et al. 2018): each step keeps a random ``keep`` fraction of the units of
    every elastic dimension (channels, heads, MLP units) and trains that sub-network.

    A unit's parameters are its incoming rows (weight, bias, batch-norm affine) and the columns
    that read it; layers sizing the same dimension (a conv and its batch norm, a stage's
    residual stream) drop the same units. ``nested``: the kept units are a prefix, of a width
    drawn uniformly from ``[keep, 1]`` per step (ordered dropout, Horvath et al. 2021: the
    slimmable form)."""

    name = "unit-dropout"

    def __init__(self, model: nn.Module, seed: int, keep: float = 0.5, nested: bool = False):
        super().__init__(model, seed)
        self.keep, self.nested = keep, nested
        self.layout = unit_layout(model)
        if not self.layout:  # a graph family's units are its timm layers' channels, which it does not declare
            raise ValueError(f"--update unit-dropout needs a family of zoo's elastic layers; {model.arch} has none")

    def draw(self) -> Masks:
        width = (
            self.keep + (1 - self.keep) * float(torch.rand((), generator=self.generator, device="cpu"))
            if self.nested
            else self.keep
        )
        kept: dict[Dim, torch.Tensor] = {}
        for dim in sorted({d for axes in self.layout.values() for _, d, _, _ in axes}, key=repr):
            n = max(1, int(width * dim.units + 0.5))
            units = (
                torch.arange(n, device="cpu")
                if self.nested
                else torch.randperm(dim.units, generator=self.generator, device="cpu")[:n]
            )
            kept[dim] = torch.zeros(dim.units, dtype=torch.bool, device="cpu").index_fill_(0, units, True)
        masks = {}
        for p, axes in self.layout.items():
            m = torch.ones_like(p, dtype=torch.bool)
            for axis, dim, chunks, size in axes:
                features = kept[dim].repeat_interleave(dim.unit_size)[:size].repeat(chunks).to(p.device)
                m &= features.view(*[1] * axis, -1, *[1] * (p.dim() - axis - 1))
            masks[p] = m
        return masks


class RankDropout(_Structured):
    """Nested (ordered) rank dropout, as DyLoRA (Valipour et al. 2023) and Maestro (Horvath et
    al. 2024) train ranks: each step keeps a prefix of every factorized layer's rank, a fraction
    drawn uniformly from ``[keep, 1]``."""

    name = "rank-dropout"

    def __init__(self, model: nn.Module, seed: int, keep: float = 0.25):
        super().__init__(model, seed)
        self.keep = keep
        self.factors = [(m.u, m.v) for m in model.modules() if isinstance(m, ElasticLayer) and m.low_rank]
        if not self.factors:
            raise ValueError("--update rank-dropout needs a family with factorized layers (--low-rank)")

    def draw(self) -> Masks:
        fraction = self.keep + (1 - self.keep) * float(torch.rand((), generator=self.generator, device="cpu"))
        masks = {}
        for u, v in self.factors:
            n = max(1, int(fraction * v.shape[0] + 0.5))
            masks[u] = torch.zeros_like(u, dtype=torch.bool)
            masks[u][:, :n] = True
            masks[v] = torch.zeros_like(v, dtype=torch.bool)
            masks[v][:n] = True
        return masks


def unit_layout(model: nn.Module) -> dict[nn.Parameter, list[tuple[int, Dim, int, int]]]:
    """For each parameter, its axes that index units of an elastic dimension:
    ``(axis, dim, chunks, features per chunk)``."""
    layout: dict[nn.Parameter, list] = {}

    def add(p: nn.Parameter | None, axis: int, dim: Dim | None, chunks: int = 1) -> None:
        if p is not None and dim is not None and dim.elastic:
            layout.setdefault(p, []).append((axis, dim, chunks, p.shape[axis] // chunks))

    for module in model.modules():
        if isinstance(module, ElasticBatchNorm2d):
            add(module.weight, 0, module.out_dim)
            add(module.bias, 0, module.out_dim)
        elif isinstance(module, (ElasticLinear, ElasticConv2d)):
            rows, columns = (module.u, module.v) if module.low_rank else (module.weight, module.weight)
            add(rows, 0, module.out_dim, module.chunks)
            add(module.bias, 0, module.out_dim, module.chunks)
            if not getattr(module, "depthwise", False):
                add(columns, 1, module.in_dim)
    return layout


def intersect(a: Masks | None, b: Masks | None) -> Masks | None:
    """Both masks at once (``None``: all coordinates)."""
    if not a or not b:
        return a or b or None
    both = dict(a)
    for p, m in b.items():
        both[p] = both[p] & m if p in both else m
    return both


def partial_gradient(
    policy: UpdatePolicy, gradient: Gradient, members: Masks | None, look_ahead: Gradient | None = None
) -> tuple[list[torch.Tensor], Masks | None]:
    """Leave ``g(x + δ)`` in ``.grad`` with the weights back at ``x`` bit for bit; return the
    losses at ``x + δ`` and the step's mask ``m``. ``look_ahead`` is the gradient as the
    perturbation reads it (under fp16 loss scaling: unscaled); by default ``gradient``."""
    moves = policy.perturbation(look_ahead or gradient, members)
    saved = {p: p.detach().clone() for p in moves}
    with torch.no_grad():
        for p, delta in moves.items():
            p.add_(delta)
    losses = gradient()
    with torch.no_grad():
        for p, x in saved.items():
            p.copy_(x)
    return losses, policy.mask(members)


_CLASSES = {cls.name: cls for cls in (UpdatePolicy, SAM, Extragradient, MeProp, UnitDropout, RankDropout)}
_OPTIONS = {"rho": ("sam", "--rho"), "eg_lr": ("extragradient", "--eg-lr"),
            "keep": (("meprop", "unit-dropout", "rank-dropout"), "--keep"),
            "units": ("meprop", "--meprop-units"), "nested": ("unit-dropout", "--nested")}  # fmt: skip
NESTED_NOTE = (
    "it draws a nested sub-network per step, itself a member schedule: "
    "use it with --strategy separate, or train members with --strategy random"
)


def create_policy(name: str, model: nn.Module, seed: int, *, strategy: str = "separate", **options) -> UpdatePolicy:
    """A policy by name; options (``rho``, ``eg_lr``, ``keep``, ``units``, ``nested``) that are
    ``None`` or ``False`` take the policy's defaults. Meaningless combinations raise ValueError."""
    if name not in _CLASSES:
        raise ValueError(f"unknown update {name!r}; choose one of {', '.join(UPDATES)}")
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    for key, value in given.items():
        owners, flag = _OPTIONS[key]
        if name not in (owners if isinstance(owners, tuple) else (owners,)):
            raise ValueError(
                f"{flag} applies to --update {' or '.join(owners) if isinstance(owners, tuple) else owners}, not {name}"
            )
    for key in ("rho", "eg_lr"):
        if key in given and not given[key] > 0:
            raise ValueError(f"{_OPTIONS[key][1]} must be positive, got {given[key]}")
    if "keep" in given and not 0 < given["keep"] <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {given['keep']}")
    if (name == "rank-dropout" or given.get("nested")) and strategy != "separate":
        raise ValueError(
            f"--update {name}{' --nested' if given.get('nested') else ''} with --strategy {strategy}: {NESTED_NOTE}"
        )
    return _CLASSES[name](model, seed, **given)


@dataclass
class UpdateConfig:
    """The update policy of a run (``zoo train --update`` and its options)."""

    update: str = "full"  # full | sam | extragradient | meprop | unit-dropout | rank-dropout
    rho: float | None = None  # sam
    eg_lr: float | None = None  # extragradient
    keep: float | None = None  # meprop, unit-dropout, rank-dropout
    meprop_units: bool = False
    nested: bool = False  # unit-dropout: a random width prefix

    def create(self, model: nn.Module, seed: int, strategy: str) -> UpdatePolicy:
        """The policy; refuses options that do not apply to it, or to ``strategy``."""
        options = dict(rho=self.rho, eg_lr=self.eg_lr, keep=self.keep, units=self.meprop_units, nested=self.nested)
        return create_policy(self.update, model, seed, strategy=strategy, **options)
