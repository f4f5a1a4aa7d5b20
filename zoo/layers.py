"""Elastic layers: each runs a prefix of itself, chosen by ``set_subnet``.

A layer knows its own active slice. The model calls ``set_subnet(subnet)`` on every layer;
the layer turns the width into its active output size with its :class:`~zoo.subnet.Dim` and
reads its active input size from the input it is given. Nothing reads global state.

Slicing, not masking: a sub-network's forward and backward touch only the prefix of each
weight, so they cost the sub-network's FLOPs and the gradient outside the prefix is exactly
zero. When the active slice is the whole tensor no slicing op runs at all, which keeps a
sliced model's graph (and its ONNX export) identical to a plain network's.

Low-rank layers hold ``u`` (out x R) and ``v`` (R x in): ``W = u @ v``. They are initialised
from the SVD of a dense initialisation with the singular values split evenly between the
factors, so components are ordered by importance and rank 1.0 is the dense layer.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .subnet import Dim, Subnet, rank_count

DenseInit = Callable[[torch.Tensor], object]


def kaiming_uniform(weight: torch.Tensor) -> None:
    """PyTorch's default initialisation for Linear and Conv2d weights."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _svd_factors(dense: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``dense`` (out x in) into ``u`` (out x rank) and ``v`` (rank x in), best first.

    Runs on one thread: these matrices are small, and a multi-threaded SVD on a machine whose
    cores are busy was measured 100x slower (5.3 s against 0.05 s for 1152 x 384).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def take_rows(t: torch.Tensor, n: int, chunks: int = 1) -> torch.Tensor:
    """The first ``n`` rows of each of ``chunks`` equal row blocks of ``t``."""
    if n * chunks == t.shape[0]:
        return t
    if chunks == 1:
        return t[:n]
    return t.view(chunks, t.shape[0] // chunks, *t.shape[1:])[:, : n].reshape(chunks * n, *t.shape[1:])


class ElasticLayer(nn.Module):
    """Common state of elastic layers: the dimension specs and the active sub-network."""

    chunked = ("weight", "u", "bias")  # parameters whose rows are split into ``chunks`` blocks

    def __init__(self, out_dim: Dim, chunks: int, max_width: float, low_rank: bool, max_rank: float):
        super().__init__()
        self.out_dim = out_dim
        self.chunks = chunks
        self.low_rank = low_rank
        self.active = Subnet(max_width, max_rank if low_rank else None)

    def set_subnet(self, subnet: Subnet) -> None:
        self.active = subnet

    @property
    def active_out(self) -> int:
        """Output features per chunk at the active width."""
        return self.out_dim.count(self.active.width)

    def active_rank(self, in_features: int) -> int:
        return rank_count(self.active.rank, self.chunks * self.active_out, in_features)


class ElasticLinear(ElasticLayer):
    """A linear layer over a prefix of its inputs and outputs; dense, or low-rank ``u @ v``.

    ``chunks`` > 1 declares a fused projection (QKV, gated MLP): each of the ``chunks`` row
    blocks is sliced on its own, so a narrower QKV keeps the first heads of q, k *and* v.
    """

    def __init__(
        self,
        in_dim: Dim,
        out_dim: Dim,
        *,
        chunks: int = 1,
        bias: bool = True,
        low_rank: bool = False,
        max_width: float = 1.0,
        max_rank: float = 1.0,
        init: DenseInit = kaiming_uniform,
    ):
        super().__init__(out_dim, chunks, max_width, low_rank, max_rank)
        self.in_features = in_dim.count(max_width)
        self.out_features = chunks * out_dim.count(max_width)
        dense = torch.empty(self.out_features, self.in_features)
        init(dense)
        if low_rank:
            u, v = _svd_factors(dense, rank_count(max_rank, self.out_features, self.in_features))
            self.u, self.v = nn.Parameter(u), nn.Parameter(v)
        else:
            self.weight = nn.Parameter(dense)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = x.shape[-1], self.active_out
        bias = None if self.bias is None else take_rows(self.bias, n_out, self.chunks)
        if not self.low_rank:
            weight = take_rows(self.weight, n_out, self.chunks)
            return F.linear(x, weight if n_in == weight.shape[1] else weight[:, :n_in], bias)
        r = self.active_rank(n_in)
        v = self.v if (r, n_in) == tuple(self.v.shape) else self.v[:r, :n_in]
        u = take_rows(self.u, n_out, self.chunks)
        return F.linear(F.linear(x, v), u if r == u.shape[1] else u[:, :r], bias)

    def extra_repr(self) -> str:
        kind = f"low_rank={self.v.shape[0]}" if self.low_rank else "dense"
        return f"in={self.in_features}, out={self.out_features}, chunks={self.chunks}, {kind}"


class ElasticConv2d(ElasticLayer):
    """A conv over a prefix of its channels: dense, depthwise, or low-rank.

    Low-rank is a ``k x k`` conv into ``r`` channels followed by a ``1 x 1`` conv (``v`` then
    ``u``), the factorisation of the dense kernel reshaped to ``out x (in * k * k)``.
    Depthwise convs have one filter per channel and are never factorized.
    """

    def __init__(
        self,
        in_dim: Dim,
        out_dim: Dim,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        depthwise: bool = False,
        bias: bool = False,
        low_rank: bool = False,
        max_width: float = 1.0,
        max_rank: float = 1.0,
        init: DenseInit = kaiming_uniform,
    ):
        if depthwise and low_rank:
            raise ValueError("a depthwise conv cannot be low-rank")
        super().__init__(out_dim, 1, max_width, low_rank, max_rank)
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.depthwise = depthwise
        self.in_channels = in_dim.count(max_width)
        self.out_channels = out_dim.count(max_width)
        in_per_group = 1 if depthwise else self.in_channels
        dense = torch.empty(self.out_channels, in_per_group, kernel_size, kernel_size)
        init(dense)
        if low_rank:
            fan_in = in_per_group * kernel_size * kernel_size
            u, v = _svd_factors(dense.reshape(self.out_channels, fan_in), rank_count(max_rank, self.out_channels, fan_in))
            self.u = nn.Parameter(u[:, :, None, None])
            self.v = nn.Parameter(v.reshape(-1, in_per_group, kernel_size, kernel_size))
        else:
            self.weight = nn.Parameter(dense)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = x.shape[1], self.active_out
        bias = None if self.bias is None else take_rows(self.bias, n_out)
        if self.depthwise:
            weight = take_rows(self.weight, n_in)
            return F.conv2d(x, weight, bias, self.stride, self.padding, groups=n_in)
        if not self.low_rank:
            weight = take_rows(self.weight, n_out)
            weight = weight if n_in == weight.shape[1] else weight[:, :n_in]
            return F.conv2d(x, weight, bias, self.stride, self.padding)
        r = rank_count(self.active.rank, n_out, n_in * self.kernel_size**2)
        v = self.v if (r, n_in) == tuple(self.v.shape[:2]) else self.v[:r, :n_in]
        u = take_rows(self.u, n_out)
        u = u if r == u.shape[1] else u[:, :r]
        return F.conv2d(F.conv2d(x, v, None, self.stride, self.padding), u, bias)

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else (f"low_rank={self.v.shape[0]}" if self.low_rank else "dense")
        return f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, {kind}"


class ElasticBatchNorm2d(ElasticLayer):
    """Batch norm with shared affine parameters and private statistics per sub-network.

    A narrower (or lower-rank) network sees different activation statistics, so each
    sub-network of the model's grid keeps its own ``running_mean_<key>`` and
    ``running_var_<key>``. A sub-network without statistics is refused, never silently given
    another one's; :func:`zoo.recalibrate_bn` adds them from data.
    """

    chunked = ()

    def __init__(self, dim: Dim, subnets: list[Subnet], *, max_width: float = 1.0, eps: float = 1e-5, momentum: float = 0.1):
        low_rank = any(s.rank is not None for s in subnets)
        super().__init__(dim, 1, max_width, low_rank, max((s.rank or 1.0) for s in subnets))
        self.num_features = dim.count(max_width)
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        for subnet in subnets:
            self.add_stats(subnet)

    def add_stats(self, subnet: Subnet) -> None:
        """Create fresh statistics (mean 0, variance 1) for ``subnet``."""
        n = self.out_dim.count(subnet.width)
        self.register_buffer(f"running_mean_{subnet.key}", torch.zeros(n))
        self.register_buffer(f"running_var_{subnet.key}", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self.active.key
        mean, var = getattr(self, f"running_mean_{key}"), getattr(self, f"running_var_{key}")
        n = x.shape[1]
        weight = self.weight if n == self.num_features else self.weight[:n]
        bias = self.bias if n == self.num_features else self.bias[:n]
        return F.batch_norm(x, mean, var, weight, bias, self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class LayerFactory:
    """Builds a family's elastic layers with its shared settings, so a family reads as an
    architecture: ``f.conv(f.dim(64), f.dim(128), 3, stride=2)`` rather than a wall of flags.
    """

    def __init__(self, *, max_width: float, low_rank: bool, max_rank: float | None, subnets: list[Subnet], divisor: int = 1):
        self.max_width, self.low_rank, self.max_rank = max_width, low_rank, max_rank or 1.0
        self.subnets, self.divisor = subnets, divisor

    def dim(self, units: int, unit_size: int = 1) -> Dim:
        """An elastic dimension rounded to this family's divisor (use divisor 1 for heads)."""
        return Dim(units, unit_size, self.divisor if unit_size == 1 else 1)

    def conv(self, in_dim: Dim, out_dim: Dim, kernel_size: int, *, factorize: bool = True, **kwargs) -> ElasticConv2d:
        low_rank = self.low_rank and factorize and not kwargs.get("depthwise", False)
        return ElasticConv2d(in_dim, out_dim, kernel_size, low_rank=low_rank, max_width=self.max_width, max_rank=self.max_rank, **kwargs)

    def linear(self, in_dim: Dim, out_dim: Dim, *, factorize: bool = True, **kwargs) -> ElasticLinear:
        low_rank = self.low_rank and factorize
        return ElasticLinear(in_dim, out_dim, low_rank=low_rank, max_width=self.max_width, max_rank=self.max_rank, **kwargs)

    def bn(self, dim: Dim) -> ElasticBatchNorm2d:
        return ElasticBatchNorm2d(dim, self.subnets, max_width=self.max_width)
