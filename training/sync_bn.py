"""``--sync-bn``: batch-norm statistics over the whole global batch, not each process's share.

Without it each process normalises with the statistics of its own share of the batch (DDP's
default), so a batch-norm family trains differently on 1 and on N processes. With it every
:class:`~zoo.layers.ElasticBatchNorm2d` computes the mean and variance of the global batch:
two all-reduces per layer (the sum and count, then the sum of squared deviations from the
global mean: the two-pass formula, as exact as a single process's). Both are torch's
functional all-reduce (``torch.distributed._functional_collectives``, what
``torch.distributed.nn`` now points to), whose backward all-reduces the gradient, so the
backward is also the global batch's. Running statistics are updated with the global (unbiased)
variance, as one process holding the whole batch would.

torch's own ``nn.SyncBatchNorm`` kernels (``batch_norm_stats``) run on CUDA only, and its module
holds one set of running statistics; this works on any backend (gloo on CPU too) and with the
per-member statistics of the elastic layer. It is active only inside :meth:`SyncBatchNorm.active`
(the training step's forward and backward, which every process runs); evaluation and
recalibration, which rank 0 runs alone, use the plain per-process normalisation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
import torch.nn.functional as F
from torch import nn

from zoo.layers import ElasticBatchNorm2d


def synced_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm`` with the statistics of every process's input together (training only)."""
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    values = x.float()
    local = torch.cat([values.sum(dims), values.new_tensor([values.numel() / values.shape[1]])])
    total = collectives.all_reduce(local, "sum", dist.group.WORLD)
    count = total[-1]
    mean = total[:-1] / count
    centred = values - mean.view(shape)
    var = collectives.all_reduce(centred.pow(2).sum(dims), "sum", dist.group.WORLD) / count
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.detach(), momentum)
            running_var.lerp_(var.detach() * (count / (count - 1)), momentum)
    out = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape) + bias.view(shape)
    return out.to(x.dtype)


class SyncBatchNorm:
    """Switches a model's elastic batch norms to :func:`synced_batch_norm` for a block."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, ElasticBatchNorm2d)]
        if not self.layers and getattr(model, "uses_batchnorm", False):  # the graph family: timm's own norms
            raise ValueError("--sync-bn: this family's batch norms are timm's own, which zoo does not synchronise")
        if not self.layers:
            raise ValueError("--sync-bn: this family has no batch norm (its LayerNorm needs no synchronisation)")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            yield  # one process: its batch is the global batch
            return
        for layer in self.layers:
            layer.batch_norm = synced_batch_norm
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.batch_norm  # back to the class's F.batch_norm
