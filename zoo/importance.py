"""Importance before nesting: order every elastic dimension so that its prefixes keep the units
that matter most.

A member is a prefix of each elastic dimension, so a family made from a trained network is only
as good as the order of its units. This module finds each dimension's *coupling* (every tensor
axis that indexes the same units: the rows of the layers that write them, the batch-norm
parameters and statistics that follow them, the columns of the layers that read them), scores
its units and permutes all of those axes by one permutation, which leaves the full network's
function unchanged.

Couplings per family:

* ResNet: a stage's residual channels (every block's last conv and batch norm, the stage's
  downsampling shortcut, and for basic blocks in stage 0 the stem: they are added together) are
  one coupling, read by every block's first conv, the next stage's shortcut and the classifier;
  each block's inner channels are their own (two in a bottleneck).
* MobileNetV2: the stream between residual additions (a stage's blocks after the first add to
  it), and each block's expanded channels (the expansion conv, the depthwise conv and their batch
  norms, read by the projection).
* ViT and GPT: each block's attention heads as whole heads (the head's rows in q, k and v, its
  columns of the output projection) and its MLP hidden units (rows of fc1, columns of fc2). The
  residual width is not elastic in zoo's Transformers, so it is never permuted.

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

from .layers import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear

ORDERS = ("weight", "activation", "none")
Layer = ElasticConv2d | ElasticLinear


@dataclass
class Coupling:
    """One elastic dimension: ``units`` units of ``unit_size`` features (a head: head_dim)."""

    name: str
    units: int
    unit_size: int = 1
    writers: list[Layer] = field(default_factory=list)  # their output rows (per chunk) are the units
    norms: list[ElasticBatchNorm2d] = field(default_factory=list)  # parameters and statistics follow
    depthwise: list[ElasticConv2d] = field(default_factory=list)  # one filter per unit: rows follow
    readers: list[Layer] = field(default_factory=list)  # their input columns are the units

    def features(self, order: torch.Tensor) -> torch.Tensor:
        """Feature indices of a unit order (each unit's ``unit_size`` features stay together)."""
        return (order[:, None] * self.unit_size + torch.arange(self.unit_size)).flatten()


def couplings(model: nn.Module) -> list[Coupling]:
    """Every elastic dimension of a zoo family with what is coupled to it (see module doc)."""
    from .models.gpt import SlimGPT
    from .models.mobilenetv2 import SlimMobileNetV2
    from .models.resnet import SlimResNet
    from .models.vit import SlimVisionTransformer

    if isinstance(model, SlimResNet):
        return _resnet(model)
    if isinstance(model, SlimMobileNetV2):
        return _mobilenetv2(model)
    if isinstance(model, (SlimVisionTransformer, SlimGPT)):
        return _transformer(model)
    raise ValueError(f"no importance ordering for {type(model).__name__}")


def _out(layer: Layer) -> int:
    return getattr(layer, "out_channels", None) or layer.out_features // layer.chunks


def _resnet(model) -> list[Coupling]:
    stem_conv, stem_bn = model.stem[0], model.stem[1]
    stream = Coupling("stem", _out(stem_conv), writers=[stem_conv], norms=[stem_bn])
    found = [stream]
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.values()):
            convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
            bns = [block.bn1, block.bn2] + ([block.bn3] if hasattr(block, "bn3") else [])
            for k, (conv, bn) in enumerate(zip(convs[:-1], bns[:-1])):
                found.append(
                    Coupling(
                        f"stages.{i}.{j} inner {k + 1}", _out(conv), writers=[conv], norms=[bn], readers=[convs[k + 1]]
                    )
                )
            stream.readers.append(block.conv1)
            if block.shortcut is not None:
                stream.readers.append(block.shortcut[0])
                stream = Coupling(
                    f"stages.{i} residual",
                    _out(block.shortcut[0]),
                    writers=[block.shortcut[0]],
                    norms=[block.shortcut[1]],
                )
                found.append(stream)
            elif stream.name == "stem":
                stream.name = f"stem and stages.{i} residual"
            stream.writers.append(convs[-1])
            stream.norms.append(bns[-1])
    stream.readers.append(model.fc)
    return found


def _mobilenetv2(model) -> list[Coupling]:
    stem_conv, stem_bn = model.stem[0], model.stem[1]
    stream = Coupling("stem", _out(stem_conv), writers=[stem_conv], norms=[stem_bn])
    found = [stream]
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage.values()):
            dw_conv, dw_bn = block.depthwise[0], block.depthwise[1]
            if block.expand is None:  # the depthwise conv filters the stream itself
                hidden = stream
            else:
                stream.readers.append(block.expand[0])
                hidden = Coupling(
                    f"blocks.{i}.{j} expanded",
                    _out(block.expand[0]),
                    writers=[block.expand[0]],
                    norms=[block.expand[1]],
                )
                found.append(hidden)
            hidden.depthwise.append(dw_conv)
            hidden.norms.append(dw_bn)
            hidden.readers.append(block.project)
            if not block.use_residual:
                stream = Coupling(f"blocks.{i}.{j} output", _out(block.project))
                found.append(stream)
            stream.writers.append(block.project)
            stream.norms.append(block.bn)
    stream.readers.append(model.final_conv[0])
    return found


def _transformer(model) -> list[Coupling]:
    found = []
    for index, block in model.blocks.items():
        attn, mlp = block.attn, block.mlp
        heads = _out(attn.qkv) // attn.head_dim
        found.append(Coupling(f"blocks.{index} heads", heads, attn.head_dim, writers=[attn.qkv], readers=[attn.proj]))
        found.append(Coupling(f"blocks.{index} mlp", _out(mlp.fc1), writers=[mlp.fc1], readers=[mlp.fc2]))
    return found


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
    per_chunk = matrix.reshape(chunks, coupling.units, coupling.unit_size, -1)
    return per_chunk.pow(2).sum((0, 2, 3)).sqrt()


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
            x = x.reshape(-1, coupling.units, coupling.unit_size)
            sums[r] += x.abs().sum(0)[:, 0] if coupling.unit_size == 1 else x.norm(dim=-1).sum(0)
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
        for name in ("weight", "u", "bias"):
            tensor = getattr(layer, name, None)
            if tensor is None or (name == "weight" and layer.low_rank):
                continue
            chunks = layer.chunks if name in layer.chunked else 1
            blocks = tensor.view(chunks, -1, *tensor.shape[1:])
            tensor.copy_(blocks[:, index].reshape(tensor.shape))
    for layer in coupling.readers:
        tensor = layer.v if layer.low_rank else layer.weight
        tensor.copy_(tensor[:, index])
    for layer in coupling.depthwise:
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                tensor.copy_(tensor[index])
    for bn in coupling.norms:
        for name, tensor in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
            if tensor.shape[0] != len(index):
                raise ValueError(
                    f"cannot reorder {coupling.name}: {name} belongs to a narrower member; reorder before recalibrating members"
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
