"""From a family to a standalone member, and batch-norm recalibration for a new member.

Because every axis is nested, a member is the same architecture built at smaller sizes
whose every tensor is a prefix of the family's tensor (per row block for fused projections).
Slicing is therefore generic: build the small model from the family's arguments, then copy
the matching prefix of each tensor. It knows nothing of masks.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from .base import ElasticModel
from .registry import create_uninitialized
from .space import Member


def _build_member(model: ElasticModel, chosen: Member, device: torch.device | str) -> ElasticModel:
    """The family's architecture at one member's sizes (and blocks), uninitialised: every
    tensor is copied. Its one trained member is ``chosen``."""
    member = chosen.to_dict()
    args = {**model.model_args, "max_member": member, "widths": [], "ranks": [], "extra_members": [member]}
    return create_uninitialized(model.arch, device, **args)


def _pairs(model: ElasticModel, member: ElasticModel, buffers: bool = True):
    """(name, member tensor, family tensor, row chunks) for every tensor of the member."""
    for name, module in member.named_modules():
        source = model.get_submodule(name)
        chunks = getattr(source, "chunks", 1)
        chunked = getattr(source, "chunked", ())
        tensors = [*module.named_parameters(recurse=False), *(module.named_buffers(recurse=False) if buffers else ())]
        for pname, tensor in tensors:
            full_name = f"{name}.{pname}" if name else pname
            yield full_name, tensor, getattr(source, pname), chunks if pname in chunked else 1


@torch.no_grad()
def slice_model(
    model: ElasticModel, member=None, rank: float | None = None, *, width: float | None = None, **axes
) -> ElasticModel:
    """A physically smaller copy of ``model`` at one member, equal in output to it.

    ``member``: a ``Member``, its dict (``{"width": [0.5, 1, 1], "depth": [1, 3, 3]}``) or a
    uniform width; blocks the member skips are not in the copy."""
    chosen = model.resolve_member(member, rank, width=width, **axes)
    model.set_member(chosen)  # validates (batch-norm statistics must exist)
    small = _build_member(model, chosen, next(model.parameters()).device)
    for name, tensor, source, chunks in _pairs(model, small):
        part = model.member_part(chosen, name, source, tensor.shape, chunks)
        owner, _, leaf = name.rpartition(".")
        module = small.get_submodule(owner)
        if part.shape != tensor.shape and leaf in module._non_persistent_buffers_set:
            module.register_buffer(leaf, part.clone(), persistent=False)  # a cache the model grew (convit's)
        else:
            tensor.copy_(part)
    small.train(model.training)
    small.zoo_metadata = dict(getattr(model, "zoo_metadata", {}))
    return small


def parameter_masks(model: ElasticModel, chosen: Member) -> dict[str, torch.Tensor]:
    """For each parameter the member uses, a bool tensor that is True on the coordinates it uses
    (parameters of skipped blocks are absent).

    The region is exactly what :func:`slice_model` copies, so a masked update moves the
    sliced member's parameters and nothing else.
    """
    chosen = model.resolve_member(chosen)
    member = _build_member(model, chosen, "meta")
    masks = {}
    for name, tensor, source, chunks in _pairs(model, member, buffers=False):
        coordinates = torch.arange(source.numel(), device=source.device).view(source.shape)
        mask = torch.zeros(source.numel(), dtype=torch.bool, device=source.device)
        mask[model.member_part(chosen, name, coordinates, tensor.shape, chunks).flatten()] = True
        masks[name] = mask.view(source.shape)
    return masks


def count_params(model: ElasticModel, member=None) -> int:
    """Parameters of a member (the active one if None): those its sliced copy holds."""
    chosen = model.active_member if member is None else model.resolve_member(member)
    return sum(p.numel() for p in _build_member(model, chosen, "meta").parameters())


@contextlib.contextmanager
def use_member(
    model: ElasticModel, member=None, rank: float | None = None, *, width: float | None = None, **axes
) -> Iterator[Member]:
    """Run ``model`` as one member inside the block, then restore the previous one."""
    previous = model.active_member
    try:
        yield model.set_member(member, rank, width=width, **axes)
    finally:
        model.set_member(previous, for_training=True)


@torch.no_grad()
def recalibrate_bn(
    model: ElasticModel,
    batches: Iterable[torch.Tensor],
    member=None,
    rank: float | None = None,
    *,
    width: float | None = None,
    max_batches: int | None = None,
    **axes,
) -> Member:
    """Estimate a member's batch-norm statistics from data (exact average over batches).

    The member is added to the model's trained members if new; its statistics are reset and
    replaced by the cumulative average of per-batch statistics, as in Universally Slimmable
    Networks' post-statistics. No parameter changes.
    """
    chosen = model.resolve_member(member, rank, width=width, **axes)
    if not model.uses_batchnorm:
        return chosen
    model.add_member(chosen)
    model.reset_stats(chosen.key, model.expand(chosen))
    was_training, previous = model.training, model.active_member
    model.set_member(chosen)
    bns = model.norm_layers()
    momenta = [bn.momentum for bn in bns]
    model.train()
    seen = 0
    try:
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            for bn in bns:
                bn.momentum = 1.0 / (seen + 1)
            model(batch)
            seen += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
        model.set_member(previous, for_training=True)
    if seen == 0:
        raise ValueError("recalibration got no batches")
    return chosen
