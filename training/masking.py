"""Masked optimizer steps: on a step that trains only a core, nothing outside the core moves.

The method's update is ``x <- x - lr * m ⊙ g``. A core's forward and backward slice the
weights, so its gradient outside the core is already exactly zero; but zero gradient is not a
masked *update*: weight decay, momentum and Adam's moments would still move coordinates the
step did not train. :func:`masked_step` wraps any ``torch.optim`` optimizer and keeps every
coordinate outside the mask bit-identical, whatever the optimizer does:

* where a mask is a box (a set of indices per axis: the member's channels, as slicing takes
  them) and the optimizer is elementwise (SGD, Adam, AdamW, ...), each tensor, its gradient and
  its optimizer state are swapped for their box for the optimizer's own ``step``, then written
  back: the step costs what the member's own step costs, as if it were trained alone;
* otherwise (a mask of another shape, an optimizer whose step reads whole tensors, as LAMB's
  norms or Adafactor's factored moments), the tensor and its state are snapshotted, the step
  runs on the whole tensor, and the out-of-mask coordinates are put back with ``torch.where``.

What this does to the optimizer state of masked coordinates (on a step that trains a core):

* their parameter values, momentum buffers (SGD) and first and second moments (Adam/AdamW)
  are *frozen*, not decayed: no gradient was sampled for them, so the step carries no new
  evidence about them, and decaying the moments would treat "not trained" as "gradient zero"
  (shrinking Adam's second moment and inflating the next step they take);
* state a core step creates for the first time (the first step of a fresh optimizer) keeps its
  initial value (zero) outside the mask, which is exactly "never touched": SGD's first
  momentum step ``buf = g`` equals ``0.9 * 0 + g``, and Adam's moments start at zero;
* Adam's step counter is one scalar per tensor, so it advances for every coordinate of a
  tensor the step touched, including its masked ones. Their bias correction
  ``1 / (1 - beta ** t)`` therefore uses a ``t`` that counts steps they sat out; the
  correction is then slightly smaller than a per-coordinate count would give. It only matters
  while ``beta2 ** t`` is not negligible (the first few thousand steps for beta2 = 0.999),
  and it shrinks updates, never enlarges them. Tensors the step did not touch at all (no
  gradient) are skipped by the optimizer, counter included.

A step that trains the largest member is unmasked and costs nothing extra.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable

import torch
from torch import nn

import zoo
from zoo import Member

Masks = dict[nn.Parameter, torch.Tensor]


class MaskCache:
    """The update mask of each step: the union of the regions of the members it trained.

    Masks hold only parameters that the member does not cover completely; ``None`` means
    "unmasked". The most recently used ``size`` members (and sets of members) are kept: enough
    for every grid, bounded for a layerwise run that draws a new member almost every step.
    """

    def __init__(self, model: zoo.ElasticModel, size: int = 64):
        self.model, self.size = model, size
        self._params = dict(model.named_parameters())
        self._members: OrderedDict[Member, Masks | None] = OrderedDict()
        self._unions: OrderedDict[frozenset[Member], Masks | None] = OrderedDict()

    def member(self, member: Member) -> Masks | None:
        if member not in self._members:
            if member == self.model.largest:
                masks = None
            else:
                regions = zoo.parameter_masks(self.model, member)
                # A parameter the member does not use at all (a skipped block) gets an all-False mask.
                every = {
                    p: regions.get(name, torch.zeros_like(p, dtype=torch.bool)) for name, p in self._params.items()
                }
                masks = {p: m for p, m in every.items() if not bool(m.all())} or None
            _remember(self._members, member, masks, self.size)
        self._members.move_to_end(member)
        return self._members[member]

    def union(self, members: Iterable[Member]) -> Masks | None:
        """The mask of a step that trained ``members``; None when it is unmasked."""
        key = frozenset(members)
        if key not in self._unions:
            parts = [self.member(s) for s in key]
            _remember(self._unions, key, parts[0] if len(parts) == 1 else _union(parts), self.size)
        self._unions.move_to_end(key)
        return self._unions[key]


def _remember(cache: OrderedDict, key, value, size: int) -> None:
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


def _union(parts: list[Masks | None]) -> Masks | None:
    if any(part is None for part in parts):
        return None
    union: Masks = {}
    for part in parts:
        for p, m in part.items():
            union[p] = m | union[p] if p in union else m
    return {p: m for p, m in union.items() if not bool(m.all())} or None


def masked_step(
    optimizer: torch.optim.Optimizer, masks: Masks | None, step: Callable[[], object] | None = None
) -> None:
    """``optimizer.step()``, except that coordinates outside ``masks`` do not change at all.

    ``masks`` maps parameters to bool tensors (True: may move); parameters not in it are
    unmasked. State tensors of a parameter's shape (momentum, moments) are masked with it;
    other state (Adam's scalar step counter) is left to the optimizer. ``step`` replaces
    ``optimizer.step`` (fp16: the gradient scaler's step, which may skip it).
    """
    step = step or optimizer.step
    if not masks:
        step()
        return
    elementwise = type(optimizer) in _ELEMENTWISE
    swapped, saved = [], []
    for p, mask in masks.items():
        if p.grad is None:  # the optimizer skips it: nothing to restore
            continue
        state = optimizer.state.get(p, {})
        box = _box(mask) if elementwise and all(_same_shape(v, p) or _scalar(v) for v in state.values()) else None
        if box is not None:
            swapped.append(_Swap(p, box, state))
        else:
            old_state = {k: v.clone() for k, v in state.items() if _same_shape(v, p)}
            saved.append((p, mask, p.detach().clone(), old_state))
    try:
        step()
    finally:
        for swap in swapped:
            swap.back(optimizer.state.get(swap.p, {}))
    with torch.no_grad():
        for p, mask, old, old_state in saved:
            p.copy_(torch.where(mask, p, old))
            for key, value in optimizer.state[p].items():
                if _same_shape(value, p):
                    before = old_state.get(key)
                    value.copy_(torch.where(mask, value, before) if before is not None else value.masked_fill(~mask, 0))


# Optimizers whose step is elementwise (scalar state aside): a coordinate's update reads only
# its own gradient and state, so stepping a box of a tensor equals stepping the whole tensor there.
_ELEMENTWISE = {
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
}


class _Swap:
    """A parameter, its gradient and its same-shape optimizer state replaced by their box for
    one step (the tensors keep their identity, so the optimizer's state stays keyed by them)."""

    def __init__(self, p: nn.Parameter, box: tuple, state: dict):
        self.p, self.box = p, box
        self.full, self.grad = p.data, p.grad
        self.state = {k: v for k, v in state.items() if _same_shape(v, p)}
        p.data = self.full[box].contiguous()
        p.grad = self.grad[box].contiguous()
        for key, value in self.state.items():
            state[key] = value[box].contiguous()

    def back(self, state: dict) -> None:
        """Write the box back into the whole tensors; state the step created gets zero outside it."""
        p, box = self.p, self.box
        with torch.no_grad():
            self.full[box] = p.data
            self.grad[box] = p.grad
            for key, value in state.items():
                if key in self.state or (_same_shape(value, p) and not _scalar(value)):
                    whole = self.state.get(key)
                    if whole is None:
                        whole = torch.zeros_like(self.full, dtype=value.dtype)
                    whole[box] = value
                    state[key] = whole
        p.data, p.grad = self.full, self.grad


def _box(mask: torch.Tensor) -> tuple | None:
    """The mask as an index per axis (a slice where it is a prefix), or None when it is not the
    product of its axes' indices. Cached per mask tensor (masks are cached per member) and
    its version (an in-place change is another mask)."""
    hit = _BOXES.get(id(mask))
    if hit is not None and hit[0] is mask and hit[1] == mask._version:
        return hit[2]
    box = None
    if mask.dim() > 0:
        others = [[d for d in range(mask.dim()) if d != a] for a in range(mask.dim())]
        axes = [torch.nonzero(mask.any(dim=dims) if dims else mask).flatten() for dims in others]
        if int(mask.sum()) == math.prod(len(i) for i in axes):
            box = _indexer(axes)
    _BOXES[id(mask)] = (mask, mask._version, box)
    while len(_BOXES) > 4096:
        _BOXES.popitem(last=False)
    return box


def _indexer(axes: list[torch.Tensor]) -> tuple:
    """Basic slices when every axis keeps a prefix (views), else broadcast index tensors."""
    if all(len(i) == 0 or int(i[-1]) == len(i) - 1 for i in axes):
        return tuple(slice(0, len(i)) for i in axes)
    return tuple(i.view([-1 if a == d else 1 for d in range(len(axes))]) for a, i in enumerate(axes))


_BOXES: OrderedDict[int, tuple[torch.Tensor, int, tuple | None]] = OrderedDict()


def _scalar(value: object) -> bool:
    return not torch.is_tensor(value) or value.dim() == 0


def _same_shape(value: object, p: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == p.shape
