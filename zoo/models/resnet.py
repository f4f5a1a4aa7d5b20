"""Width-slimmable (and optionally low-rank) ResNets.

CIFAR-style (He et al. 2016, section 4.2): a 3x3 stem, three stages of 16/32/64 channels,
depth 6n+2. ImageNet-style: a 7x7 stride-2 stem with max-pool and four stages of
64/128/256/512 channels, with basic blocks (ResNet-18) or bottlenecks (ResNet-50).
Every channel count is elastic (Slimmable Networks); downsampling shortcuts are 1x1 convs.
With ``low_rank=True`` every conv except the stem is factorized and the classifier stays dense,
the usual choice for low-rank CNNs (the first and last layers are small and sensitive).
As a backbone (timm's ``forward_intermediates``, ``features_only``) its features are the stem's
activation and each stage's output, at the active member's widths.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from torch import nn

from ..base import ImageModel, check_nchw, image_cfg
from ..layers import ElasticBlocks, LayerFactory
from ..registry import build, register_family
from ..subnet import DEFAULT_GRID, Dim, Space, fixed


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, f: LayerFactory, in_dim: Dim, planes: int, stride: int):
        super().__init__()
        dim = f.dim(planes)
        self.conv1, self.bn1 = f.conv(in_dim, dim, 3, stride=stride), f.bn(dim)
        self.conv2, self.bn2 = f.conv(dim, dim, 3), f.bn(dim)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity
        self.shortcut = _shortcut(f, in_dim, dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, f: LayerFactory, in_dim: Dim, planes: int, stride: int):
        super().__init__()
        mid, out = f.dim(planes), f.dim(planes * self.expansion)
        self.conv1, self.bn1 = f.conv(in_dim, mid, 1), f.bn(mid)
        self.conv2, self.bn2 = f.conv(mid, mid, 3, stride=stride), f.bn(mid)
        self.conv3, self.bn3 = f.conv(mid, out, 1), f.bn(out)
        nn.init.zeros_(self.bn3.weight)
        self.shortcut = _shortcut(f, in_dim, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _shortcut(f: LayerFactory, in_dim: Dim, out_dim: Dim, stride: int) -> nn.Module | None:
    if stride == 1 and in_dim == out_dim:
        return None
    return nn.Sequential(f.conv(in_dim, out_dim, 1, stride=stride), f.bn(out_dim))


class SlimResNet(ImageModel):
    """A ResNet whose every channel count (and, if low-rank, every conv's rank) is elastic."""

    def __init__(
        self,
        block: str,
        layers: tuple[int, ...],
        channels: tuple[int, ...],
        stem: str,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        global_pool: str = "avg",
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_subnets: Iterable[dict] = (),
    ):
        space = Space("stage", len(layers), ("width",), low_rank, depths=tuple(layers))
        super().__init__(
            space=space,
            low_rank=low_rank,
            widths=widths,
            ranks=ranks,
            max_member=max_member,
            extra_subnets=extra_subnets,
        )
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        stem_kind, divisor = stem, (4 if stem == "cifar" else 8)
        f = self._layer_factory(divisor)
        self.num_classes, self.in_chans = num_classes, in_chans

        first = f.at(0)  # the stem's channels are the first stage's (its blocks add to them)
        stem_dim = first.dim(channels[0])
        reduction = 1 if stem_kind == "cifar" else 2
        self._taps = [(stem_dim, reduction, "stem.2")]  # (channels, reduction, module) of each feature
        if stem_kind == "cifar":
            conv = first.conv(fixed(in_chans), stem_dim, 3, factorize=False)
            self.stem = nn.Sequential(conv, first.bn(stem_dim), nn.ReLU(inplace=True))
        else:
            conv = first.conv(fixed(in_chans), stem_dim, 7, stride=2, factorize=False)
            self.stem = nn.Sequential(conv, first.bn(stem_dim), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))

        reduction *= 1 if stem_kind == "cifar" else 2  # the max-pool
        in_dim, stages = stem_dim, []
        for i, planes in enumerate(channels):
            g = f.at(i)
            blocks = {}
            for j in range(self.max_values["depth"][i]):  # a sliced member holds only its blocks
                blocks[j] = block_cls(g, in_dim, planes, 2 if (j == 0 and i > 0) else 1)
                in_dim = g.dim(planes * block_cls.expansion)
            stages.append(ElasticBlocks(blocks, "depth", i))
            reduction *= 2 if i > 0 else 1
            self._taps.append((in_dim, reduction, f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self._feature_dim = in_dim
        self.global_pool = self._pool(global_pool)
        self.fc = self._classifier(in_dim, num_classes)
        pool_size = (-(-img_size // reduction),) * 2
        self.pretrained_cfg = image_cfg(in_chans, img_size, num_classes, "stem.0", "fc", pool_size=pool_size)
        self._finish_init()

    @property
    def num_features(self) -> int:
        """Channels ``forward_features`` returns: the active member's, as timm reads it."""
        return self._feature_dim.count_in(self._active_values)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's: the features ``indices`` picks (the last n if an int, all if None) and the
        final features. ``norm`` has nothing to apply (a ResNet ends in a stage)."""
        check_nchw(output_fmt)
        take, last = feature_take_indices(len(self._taps), indices)
        intermediates = []
        for i, layer in enumerate(self.stem):
            x = layer(x)
            if i == 2 and 0 in take:  # after the activation, before any max-pool
                intermediates.append(x)
        for i, stage in enumerate(self.stages[:last] if stop_early else self.stages, start=1):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's: drop the stages after the last feature ``indices`` needs (and the head).
        Returns the absolute indices to pass to ``forward_intermediates``."""
        take, last = feature_take_indices(len(self._taps), indices)
        for i in range(last, len(self.stages)):
            self.stages[i] = nn.Sequential()  # runs as the identity
        if last == 0 and len(self.stem) > 3:
            self.stem[3] = nn.Identity()  # the max-pool follows the stem feature
        prune_end = last < len(self._taps) - 1
        if prune_end:  # the features now end at the last tap, and the head was sized for the final ones
            self._feature_dim = self._taps[last][0]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.global_pool = self._pool(self.global_pool.pool_type if global_pool is None else global_pool)
        self._replace_classifier("fc", self._classifier(self._feature_dim, num_classes), num_classes)


def _cifar(arch: str, depth: int, pretrained: bool, kwargs: dict) -> SlimResNet:
    n = (depth - 2) // 6
    fixed_args = dict(block="basic", layers=(n, n, n), channels=(16, 32, 64), stem="cifar")
    defaults = {} if pretrained else {"num_classes": 10, "img_size": 32}  # shipped weights carry their own
    return build(SlimResNet, arch, pretrained, fixed_args, {**defaults, **kwargs})


def _imagenet(arch: str, block: str, layers: tuple[int, ...], pretrained: bool, kwargs: dict) -> SlimResNet:
    fixed_args = dict(block=block, layers=layers, channels=(64, 128, 256, 512), stem="imagenet")
    return build(SlimResNet, arch, pretrained, fixed_args, kwargs)


@register_family("resnet")
def slim_resnet20(pretrained: bool = False, **kwargs) -> SlimResNet:
    """CIFAR ResNet-20 (0.27 M parameters at width 1.0)."""
    return _cifar("slim_resnet20", 20, pretrained, kwargs)


@register_family("resnet")
def slim_resnet56(pretrained: bool = False, **kwargs) -> SlimResNet:
    """CIFAR ResNet-56 (0.85 M parameters at width 1.0)."""
    return _cifar("slim_resnet56", 56, pretrained, kwargs)


@register_family("resnet")
def slim_resnet18(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-18 with basic blocks."""
    return _imagenet("slim_resnet18", "basic", (2, 2, 2, 2), pretrained, kwargs)


@register_family("resnet")
def slim_resnet50(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-50 with bottleneck blocks."""
    return _imagenet("slim_resnet50", "bottleneck", (3, 4, 6, 3), pretrained, kwargs)


@register_family("resnet")
def slim_resnet34(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-34 with basic blocks (timm's ``resnet34``)."""
    return _imagenet("slim_resnet34", "basic", (3, 4, 6, 3), pretrained, kwargs)


@register_family("resnet")
def slim_resnet101(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-101 with bottleneck blocks (timm's ``resnet101``)."""
    return _imagenet("slim_resnet101", "bottleneck", (3, 4, 23, 3), pretrained, kwargs)


@register_family("resnet")
def slim_resnet152(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-152 with bottleneck blocks (timm's ``resnet152``)."""
    return _imagenet("slim_resnet152", "bottleneck", (3, 8, 36, 3), pretrained, kwargs)
