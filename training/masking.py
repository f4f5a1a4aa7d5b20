"""Masked optimizer steps: on a step that trains only a core, nothing outside the core moves.

The method's update is ``x <- x - lr * m ⊙ g``. A core's forward and backward slice the
weights, so its gradient outside the core is already exactly zero; but zero gradient is not a
masked *update*: weight decay, momentum and Adam's moments would still move coordinates the
step did not train. :func:`masked_step` wraps any ``torch.optim`` optimizer generically: it
snapshots the parameters that the mask does not fully cover, and every optimizer-state tensor
of the same shape, runs the optimizer's own ``step``, then puts the out-of-mask coordinates
back with ``torch.where``. The result is exact (bit for bit), whatever the optimizer does.

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
    saved = []
    for p, mask in masks.items():
        if p.grad is None:  # the optimizer skips it: nothing to restore
            continue
        state = optimizer.state.get(p, {})
        old_state = {k: v.clone() for k, v in state.items() if _same_shape(v, p)}
        saved.append((p, mask, p.detach().clone(), old_state))
    step()
    with torch.no_grad():
        for p, mask, old, old_state in saved:
            p.copy_(torch.where(mask, p, old))
            for key, value in optimizer.state[p].items():
                if _same_shape(value, p):
                    before = old_state.get(key)
                    value.copy_(torch.where(mask, value, before) if before is not None else value.masked_fill(~mask, 0))


def _same_shape(value: object, p: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == p.shape
