"""Elastic layers: each runs a prefix of itself, chosen by ``set_member``.

A layer knows its own active slice. The model calls ``set_member(values, key)`` on every layer;
the layer turns the member's values into its active input and output sizes (and rank) with
its :class:`~zoo.space.Dim` s, there and then. ``forward`` only reads those numbers and never
branches on a tensor's shape, so a model at a fixed member traces with ``torch.fx`` (timm's
and torchvision's feature extraction) into a graph specialised to that member. Nothing reads
global state.

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

from .space import Dim, Values, rank_count

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
    return _first_rows(t, n, chunks)


def _first_rows(t: torch.Tensor, n: int, chunks: int = 1) -> torch.Tensor:
    """``take_rows`` without reading ``t``'s shape (``torch.fx`` traces it as plain ops)."""
    return t[:n] if chunks == 1 else t.unflatten(0, (chunks, -1))[:, :n].flatten(0, 1)


class Elastic:
    """Anything a member configures: the model calls ``set_member`` on every such module."""

    def set_member(self, values: Values, key: str) -> None:
        raise NotImplementedError


def _size(dim: Dim, max_values: Values | None) -> int:
    """Features of ``dim`` in the largest member the layer holds (the whole layer if none)."""
    return dim.count_in(max_values) if max_values is not None else dim.count(1.0)


class ElasticLayer(nn.Module, Elastic):
    """Common state of elastic layers: the output dimension, the rank group, and the active
    member's values (one per group of every axis). Linear and conv layers also keep their
    ``in_dim`` (which units their columns read: structured dropout masks them).

    ``set_member`` resolves the active sizes once (``_resolve``); subclasses call
    ``self._resolve()`` at the end of ``__init__`` so that a layer used alone runs as built.
    """

    chunked = ("weight", "u", "bias")  # parameters whose rows are split into ``chunks`` blocks

    def __init__(self, out_dim: Dim, chunks: int, low_rank: bool, max_values: Values | None, group: int):
        super().__init__()
        self.out_dim = out_dim
        self.chunks = chunks
        self.low_rank = low_rank
        self.group = group
        self.values: Values = max_values or {}
        self.key = ""

    def set_member(self, values: Values, key: str) -> None:
        self.values, self.key = values, key
        self._resolve()

    def _resolve(self) -> None:
        """Compute the active sizes from ``self.values`` (what ``forward`` reads)."""
        self.active_out = _size(self.out_dim, self.values or None)  # output features per chunk

    def rank_fraction(self) -> float:
        return self.values["rank"][self.group] if self.values else 1.0

    def active_rank(self, m: int, n: int) -> int:
        return rank_count(self.rank_fraction(), m, n)


class ElasticLinear(ElasticLayer):
    """A linear layer over a prefix of its inputs and outputs; dense, or low-rank ``u @ v``.

    ``chunks`` > 1 declares a fused projection (QKV, gated MLP): each of the ``chunks`` row
    blocks is sliced on its own, so a narrower QKV keeps the first heads of q, k *and* v.
    """

    __constants__ = ["low_rank"]  # torch.jit.script compiles only the branch of the layer's kind

    def __init__(
        self,
        in_dim: Dim,
        out_dim: Dim,
        *,
        chunks: int = 1,
        bias: bool = True,
        low_rank: bool = False,
        max_values: Values | None = None,
        group: int = 0,
        init: DenseInit = kaiming_uniform,
    ):
        super().__init__(out_dim, chunks, low_rank, max_values, group)
        self.in_dim = in_dim
        self.in_features = _size(in_dim, max_values)
        self.out_features = chunks * _size(out_dim, max_values)
        dense = torch.empty(self.out_features, self.in_features)
        init(dense)
        if low_rank:
            u, v = _svd_factors(dense, self.active_rank(self.out_features, self.in_features))
            self.u, self.v = nn.Parameter(u), nn.Parameter(v)
        else:
            self.weight = nn.Parameter(dense)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self._resolve()

    def _resolve(self) -> None:
        super()._resolve()
        self.active_in = _size(self.in_dim, self.values or None)
        self.rank = self.active_rank(self.chunks * self.active_out, self.active_in) if self.low_rank else 0
        self.cut_rank = self.low_rank and self.rank != self.v.shape[0]  # fewer components than it holds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out, chunks = self.active_in, self.active_out, self.chunks
        cut_rows, cut_cols = chunks * n_out != self.out_features, n_in != self.in_features
        bias = self.bias if self.bias is None or not cut_rows else _first_rows(self.bias, n_out, chunks)
        if not self.low_rank:
            weight = _first_rows(self.weight, n_out, chunks) if cut_rows else self.weight
            return F.linear(x, weight[:, :n_in] if cut_cols else weight, bias)
        v = self.v[: self.rank, :n_in] if self.cut_rank or cut_cols else self.v
        u = _first_rows(self.u, n_out, chunks) if cut_rows else self.u
        return F.linear(F.linear(x, v), u[:, : self.rank] if self.cut_rank else u, bias)

    def extra_repr(self) -> str:
        kind = f"low_rank={self.v.shape[0]}" if self.low_rank else "dense"
        return f"in={self.in_features}, out={self.out_features}, chunks={self.chunks}, {kind}"


class ElasticConv2d(ElasticLayer):
    """A conv over a prefix of its channels: dense, depthwise, or low-rank.

    Low-rank is a ``k x k`` conv into ``r`` channels followed by a ``1 x 1`` conv (``v`` then
    ``u``), the factorisation of the dense kernel reshaped to ``out x (in * k * k)``.
    Depthwise convs have one filter per channel and are never factorized.
    """

    __constants__ = ["low_rank", "depthwise"]  # torch.jit.script compiles only the branch of the layer's kind

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
        max_values: Values | None = None,
        group: int = 0,
        init: DenseInit = kaiming_uniform,
    ):
        if depthwise and low_rank:
            raise ValueError("a depthwise conv cannot be low-rank")
        super().__init__(out_dim, 1, low_rank, max_values, group)
        self.in_dim = in_dim
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.depthwise = depthwise
        self.in_channels = _size(in_dim, max_values)
        self.out_channels = _size(out_dim, max_values)
        in_per_group = 1 if depthwise else self.in_channels
        dense = torch.empty(self.out_channels, in_per_group, kernel_size, kernel_size)
        init(dense)
        if low_rank:
            fan_in = in_per_group * kernel_size * kernel_size
            u, v = _svd_factors(dense.reshape(self.out_channels, fan_in), self.active_rank(self.out_channels, fan_in))
            self.u = nn.Parameter(u[:, :, None, None])
            self.v = nn.Parameter(v.reshape(-1, in_per_group, kernel_size, kernel_size))
        else:
            self.weight = nn.Parameter(dense)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self._resolve()

    def _resolve(self) -> None:
        super()._resolve()
        self.active_in = _size(self.in_dim, self.values or None)
        self.rank = self.active_rank(self.active_out, self.active_in * self.kernel_size**2) if self.low_rank else 0
        self.cut_rank = self.low_rank and self.rank != self.v.shape[0]  # fewer components than it holds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = self.active_in, self.active_out
        cut_out, cut_in = n_out != self.out_channels, n_in != self.in_channels
        bias = self.bias[:n_out] if self.bias is not None and cut_out else self.bias
        if self.depthwise:  # one filter per channel: the active channels are its input's
            return F.conv2d(
                x, self.weight[:n_in] if cut_in else self.weight, bias, self.stride, self.padding, groups=n_in
            )
        if not self.low_rank:
            weight = self.weight[:n_out] if cut_out else self.weight
            return F.conv2d(x, weight[:, :n_in] if cut_in else weight, bias, self.stride, self.padding)
        v = self.v[: self.rank, :n_in] if self.cut_rank or cut_in else self.v
        u = self.u[:n_out] if cut_out else self.u
        return F.conv2d(
            F.conv2d(x, v, None, self.stride, self.padding), u[:, : self.rank] if self.cut_rank else u, bias
        )

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else (f"low_rank={self.v.shape[0]}" if self.low_rank else "dense")
        return f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, {kind}"


class ElasticBatchNorm2d(ElasticLayer):
    """Batch norm with shared affine parameters and private statistics per member.

    A narrower (or shallower, or lower-rank) network sees different activation statistics, so
    each member of the model's grid keeps its own ``running_mean_<key>`` and
    ``running_var_<key>``. Evaluating a member without statistics is refused, never silently
    given another one's; :func:`zoo.recalibrate_bn` adds them from data. Training one (a member
    sampled from the layerwise space) normalises with the batch's statistics alone.
    """

    chunked = ()
    # The normalisation itself. Training replaces it on a module (``--sync-bn``: statistics
    # over every process's share of the batch); the signature is ``F.batch_norm``'s.
    batch_norm = staticmethod(F.batch_norm)

    def __init__(
        self,
        dim: Dim,
        members: list[tuple[str, Values]],
        *,
        max_values: Values | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ):
        super().__init__(dim, 1, False, max_values, dim.group)
        self.num_features = _size(dim, max_values)
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        for key, values in members:
            self.add_stats(key, values)
        self._resolve()

    def add_stats(self, key: str, values: Values) -> None:
        """Create fresh statistics (mean 0, variance 1) for the member ``key``."""
        n = self.out_dim.count_in(values)
        self.register_buffer(f"running_mean_{key}", torch.zeros(n))
        self.register_buffer(f"running_var_{key}", torch.ones(n))
        self._resolve()

    def has_stats(self, key: str) -> bool:
        return hasattr(self, f"running_mean_{key}")

    def _resolve(self) -> None:
        """Also name the active member's statistics ``running_mean`` / ``running_var``: the same
        tensors (None without statistics), as buffers that are not saved, so ``forward`` reads
        fixed names (``torch.jit.script`` cannot look a buffer up by a computed name). Registered
        last, so ``named_buffers`` lists each tensor under its member's name."""
        super()._resolve()
        for stat in ("mean", "var"):
            self._buffers.pop(f"running_{stat}", None)
            self.register_buffer(f"running_{stat}", getattr(self, f"running_{stat}_{self.key}", None), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._resolve()  # ``.to()`` converted the two names separately: point them at one tensor again
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._resolve()  # ``load_state_dict(assign=True)`` puts new tensors under the members' names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.active_out
        weight = self.weight if n == self.num_features else self.weight[:n]
        bias = self.bias if n == self.num_features else self.bias[:n]
        if self.running_mean is None:
            if not self.training:
                raise ValueError(
                    f"no batch-norm statistics for member {self.key}: recalibrate it first (zoo.recalibrate_bn)"
                )
            return self.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return self.batch_norm(
            x, self.running_mean, self.running_var, weight, bias, self.training, self.momentum, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ElasticBlocks(nn.ModuleDict, Elastic):
    """A sequence of blocks of which a member runs some: a CNN stage its first ``depth``
    blocks (axis ``depth``), a Transformer the chosen indices (axis ``blocks``).

    Keys are the blocks' indices in the full family, so a member sliced without some blocks
    keeps every tensor's name (``blocks.5.attn.qkv.weight`` stays that) and slicing needs no
    renaming.
    """

    def __init__(self, blocks: dict[int, nn.Module], axis: str, group: int = 0):
        super().__init__({str(i): block for i, block in blocks.items()})
        self.axis, self.group = axis, group
        self.active = list(self.keys())

    def __getitem__(self, index: int | str) -> nn.Module:
        """``blocks[i]`` is the i-th block held (as in ``nn.Sequential``); ``blocks["5"]`` the
        block with index 5 in the full family."""
        return list(self.values())[index] if isinstance(index, int) else super().__getitem__(index)

    def set_member(self, values: Values, key: str) -> None:
        if self.axis == "depth":
            self.active = list(self.keys())[: values["depth"][self.group]]
        else:  # the chosen blocks this model holds (``prune_intermediate_layers`` may drop the last ones)
            self.active = [str(i) for i in values["blocks"] if str(i) in self._modules]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, block in self.items():  # in order; ``torch.jit.script`` unrolls this loop
            if name in self.active:
                x = block(x)
        return x


class LayerFactory:
    """Builds a family's elastic layers with its shared settings, so a family reads as an
    architecture: ``f.conv(f.dim(64), f.dim(128), 3, stride=2)`` rather than a wall of flags.
    ``f.at(g)`` is the same factory for group ``g`` (a stage or block): its dimensions and
    factorized layers take that group's width and rank.
    """

    def __init__(
        self, *, max_values: Values, low_rank: bool, members: list[tuple[str, Values]], divisor: int = 1, group: int = 0
    ):
        self.max_values, self.low_rank, self.members = max_values, low_rank, members
        self.divisor, self.group = divisor, group

    def at(self, group: int) -> "LayerFactory":
        return LayerFactory(
            max_values=self.max_values, low_rank=self.low_rank, members=self.members, divisor=self.divisor, group=group
        )

    def dim(self, units: int, unit_size: int = 1, axis: str = "width") -> Dim:
        """An elastic dimension rounded to this family's divisor (divisor 1 for heads)."""
        return Dim(units, unit_size, self.divisor if unit_size == 1 else 1, axis=axis, group=self.group)

    def conv(self, in_dim: Dim, out_dim: Dim, kernel_size: int, *, factorize: bool = True, **kwargs) -> ElasticConv2d:
        low_rank = self.low_rank and factorize and not kwargs.get("depthwise", False)
        return ElasticConv2d(
            in_dim, out_dim, kernel_size, low_rank=low_rank, max_values=self.max_values, group=self.group, **kwargs
        )

    def linear(self, in_dim: Dim, out_dim: Dim, *, factorize: bool = True, **kwargs) -> ElasticLinear:
        low_rank = self.low_rank and factorize
        return ElasticLinear(in_dim, out_dim, low_rank=low_rank, max_values=self.max_values, group=self.group, **kwargs)

    def bn(self, dim: Dim) -> ElasticBatchNorm2d:
        return ElasticBatchNorm2d(dim, self.members, max_values=self.max_values)
