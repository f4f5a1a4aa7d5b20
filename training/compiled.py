"""``--compile``: the training forward and backward through ``torch.compile``, one graph per member.

A member's forward *slices* the weights (:mod:`zoo.layers`): a width-0.5 member multiplies
half-size matrices, so every member is its own graph with its own static shapes, and each
costs only its own FLOPs. (Masking instead, multiplying full-size weights by 0/1 masks, would
give one graph for all members at the full model's cost on every step.) Dynamo guards on the
values ``set_member`` gives each layer, so the first step of a member fails the guards of the
graphs compiled so far and compiles its own: graphs are compiled lazily, the first time a
member trains, and reused on every later step of it. Shapes are static (``dynamic=False``):
the batch and sequence length never change within a run, and a dynamic-shape graph would be
slower for no gain.

Dynamo keeps at most ``recompile_limit`` graphs per function and silently runs further
members eagerly; the limit is raised to the number of trained members (twice: a member that
trains on batch statistics alone is another graph) plus slack. (Importing ``timm.optim``, as
building the optimizer does, already sets it to 1e6 through timm's ``kron.py``; the raise keeps
the guarantee where that import changes.) A layerwise space draws a new
member almost every step, which would compile almost every step: it is refused.

Evaluation, recalibration and the EMA weights run eagerly (they run a few batches per member).
"""

from __future__ import annotations

from torch import nn


def check_backend(backend: str) -> None:
    """A one-line error for a backend torch.compile does not know."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"--compile-backend must be one of {', '.join(sorted(known))}, got {backend!r}")


def compile_model(net: nn.Module, backend: str, members: int) -> nn.Module:
    """``torch.compile(net)`` with room for a graph per member."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * members + 4)
    return torch.compile(net, backend=backend, dynamic=False)
