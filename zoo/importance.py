"""Importance before nesting: order every elastic dimension so that its prefixes keep the units
that matter most.

A member is a prefix of each elastic dimension, so a family made from a trained network is only
as good as the order of its units. This module finds each dimension's *coupling* (every tensor
axis that indexes the same units: the rows of the layers that write them, the batch-norm
parameters and statistics that follow them, the columns of the layers that read them), scores
its units and permutes all of those axes by one permutation, which leaves the full network's
function unchanged.

Each family finds its own couplings (``ElasticModel.couplings``, in its module under
:mod:`zoo.models`); this module scores and permutes them, knowing no family.

Criteria (``order=``):

* ``weight``: no data. How strongly a unit is written times how strongly it is read: the
  mean over its writers of the unit's output scale (after a batch norm ``sqrt(gamma^2 +
  beta^2)``, the norm divides the conv's own scale away; otherwise the norm of its rows) times
  the mean over its readers of the norm of the columns reading it, each tensor's values
  normalised to mean 1. A unit that is never written (or never read) scores zero.
* ``activation`` (Minitron, Muralidharan et al. 2024): the mean absolute activation each unit
  feeds its readers on calibration batches (a head: the L2 norm of its output vector),
  normalised per reader to mean 1 and summed.
* ``none``: keep the source order (the naive prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from .base import ElasticModel
from .layers import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear

ORDERS = ("weight", "activation", "none")
Layer = ElasticConv2d | ElasticLinear


@dataclass
class Coupling:
    """One elastic dimension: ``units`` units of ``unit_size`` features (a head: head_dim).

    A layer may hold a unit in more features than ``unit_size``: each writer's and reader's
    features per unit are its own size over ``units`` (grouped-query attention: a key/value
    group is one key head's rows of k and its query heads' rows of q)."""

    name: str
    units: int
    unit_size: int = 1
    writers: list[Layer] = field(default_factory=list)  # their output rows (per chunk) are the units
    norms: list[ElasticBatchNorm2d] = field(default_factory=list)  # parameters and statistics follow
    depthwise: list[ElasticConv2d] = field(default_factory=list)  # one filter per unit: rows follow
    readers: list[Layer] = field(default_factory=list)  # their input columns are the units

    def features(self, order: torch.Tensor, unit_size: int | None = None) -> torch.Tensor:
        """Feature indices of a unit order (each unit's ``unit_size`` features stay together)."""
        size = self.unit_size if unit_size is None else unit_size
        return (order[:, None] * size + torch.arange(size)).flatten()


def couplings(model: nn.Module) -> list[Coupling]:
    """Every elastic dimension of a zoo family with what is coupled to it: the family's own
    ``couplings()``."""
    if not isinstance(model, ElasticModel):
        raise ValueError(f"no importance ordering for {type(model).__name__}")
    return model.couplings()


def out_units(layer: Layer) -> int:
    """A writer's output units (per chunk of a fused projection)."""
    return getattr(layer, "out_channels", None) or layer.out_features // layer.chunks


# ----- scores --------------------------------------------------------------------------------
def _normalised(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _dense(layer: Layer) -> torch.Tensor:
    """The layer's weight as a dense matrix-like tensor (a factorized layer's ``u @ v``), so the
    weight criterion does not depend on how the layer is stored."""
    if not layer.low_rank:
        return layer.weight.detach()
    u, v = layer.u.detach().flatten(1), layer.v.detach()
    return (u @ v.flatten(1)).reshape(u.shape[0], *v.shape[1:])


def _rows(layer: Layer) -> torch.Tensor:
    """The layer's output-side matrix, one row per output feature (chunks stacked)."""
    return _dense(layer).flatten(1)


def _columns(layer: Layer) -> torch.Tensor:
    """The layer's input-side matrix, one row per input feature."""
    return _dense(layer).transpose(0, 1).flatten(1)


def _unit_norms(matrix: torch.Tensor, coupling: Coupling, chunks: int = 1) -> torch.Tensor:
    """Norm of each unit's slice of ``matrix`` (rows: features, per chunk)."""
    per_chunk = matrix.reshape(chunks, coupling.units, -1)  # a unit's features and their entries
    return per_chunk.pow(2).sum((0, 2)).sqrt()


@torch.no_grad()
def weight_scores(coupling: Coupling) -> torch.Tensor:
    """How strongly each unit is written times how strongly it is read (see module doc)."""
    written = write_strength(coupling)
    return written * read_strength(coupling) if coupling.readers else written


def write_strength(coupling: Coupling) -> torch.Tensor:
    """Each unit's output scale, mean-normalised per writer and averaged over the writers: after
    a batch norm ``sqrt(gamma^2 + beta^2)`` (the norm divides the conv's own scale away), else
    the norm of the unit's rows."""
    if coupling.norms:
        terms = [(bn.weight.detach() ** 2 + bn.bias.detach() ** 2).sqrt() for bn in coupling.norms]
    else:
        terms = [_unit_norms(_rows(layer), coupling, layer.chunks) for layer in coupling.writers]
    return _mean_normalised(terms, coupling.units)


def read_strength(coupling: Coupling) -> torch.Tensor:
    """The norm of the columns reading each unit, mean-normalised per reader and averaged."""
    return _mean_normalised([_unit_norms(_columns(layer), coupling) for layer in coupling.readers], coupling.units)


def _mean_normalised(terms: list[torch.Tensor], units: int) -> torch.Tensor:
    return sum((_normalised(t.reshape(units, -1).sum(1)) for t in terms), torch.zeros(units)) / max(len(terms), 1)


@torch.no_grad()
def activation_scores(model: nn.Module, found: list[Coupling], batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Mean absolute activation per unit at the input of every reader (depthwise convs read
    their unit too), normalised per reader and summed; the model runs at its active member in
    eval mode."""
    readers = [(layer, c) for c, coupling in enumerate(found) for layer in [*coupling.readers, *coupling.depthwise]]
    sums: list[torch.Tensor] = [torch.zeros(found[c].units) for _, c in readers]
    counts = [0] * len(readers)

    def hook(r: int, coupling: Coupling):
        def record(_module, inputs):
            x = inputs[0].detach().float()
            if x.dim() == 4:  # (B, C, H, W): channels on axis 1
                x = x.transpose(1, -1)
            x = x.reshape(-1, coupling.units, x.shape[-1] // coupling.units)
            sums[r] += x.abs().sum(0)[:, 0] if x.shape[-1] == 1 else x.norm(dim=-1).sum(0)
            counts[r] += x.shape[0]

        return record

    handles = [layer.register_forward_pre_hook(hook(r, found[c])) for r, (layer, c) in enumerate(readers)]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            model(batch)
            seen += 1
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("activation importance got no calibration batches")
    scores = [torch.zeros(c.units) for c in found]
    for r, (_, c) in enumerate(readers):
        scores[c] += _normalised(sums[r] / counts[r])
    return scores


def scores(
    model: nn.Module, order: str, batches: Iterable[torch.Tensor] | None = None, found: list[Coupling] | None = None
) -> list[torch.Tensor]:
    """Importance of every unit of every coupling (``couplings(model)`` order)."""
    found = couplings(model) if found is None else found
    if order == "weight":
        return [weight_scores(c) for c in found]
    if order == "activation":
        if batches is None:
            raise ValueError("order 'activation' needs calibration batches (--calibrate DATA)")
        return activation_scores(model, found, batches)
    raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


# ----- permutation ---------------------------------------------------------------------------
@torch.no_grad()
def permute(coupling: Coupling, order: torch.Tensor) -> None:
    """Reorder the coupling's units: every coupled axis by the same permutation."""
    index = coupling.features(order)
    for layer in coupling.writers:
        rows = coupling.features(order, out_units(layer) // coupling.units)
        for name in ("weight", "u", "bias"):
            tensor = getattr(layer, name, None)
            if tensor is None or (name == "weight" and layer.low_rank):
                continue
            chunks = layer.chunks if name in layer.chunked else 1
            blocks = tensor.view(chunks, -1, *tensor.shape[1:])
            tensor.copy_(blocks[:, rows].reshape(tensor.shape))
    for layer in coupling.readers:
        tensor = layer.v if layer.low_rank else layer.weight
        tensor.copy_(tensor[:, coupling.features(order, tensor.shape[1] // coupling.units)])
    for layer in coupling.depthwise:
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                tensor.copy_(tensor[index])
    for bn in coupling.norms:
        for name, tensor in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            if tensor.shape[0] != len(index):
                raise ValueError(
                    f"cannot reorder {coupling.name}: {name} belongs to a narrower member; "
                    "reorder before recalibrating members"
                )
            tensor.copy_(tensor[index])


def reorder(model: nn.Module, order: str, batches: Iterable[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Permute every elastic dimension of ``model`` (at full size) by importance, most important
    first; the full model computes what it computed. Returns each coupling's sorted scores."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    found = couplings(model)
    if order == "none":
        return {}
    ranked = {}
    for coupling, score in zip(found, scores(model, order, batches, found)):
        best_first = torch.sort(score, descending=True, stable=True)
        permute(coupling, best_first.indices)
        ranked[coupling.name] = best_first.values
    return ranked
