"""Width-slimmable (and optionally low-rank) ResNets.

CIFAR-style (He et al. 2016, section 4.2): a 3x3 stem, three stages of 16/32/64 channels,
depth 6n+2. ImageNet-style: a 7x7 stride-2 stem with max-pool and four stages of
64/128/256/512 channels, with basic blocks (ResNet-18) or bottlenecks (ResNet-50).
Every channel count is elastic (Slimmable Networks); downsampling shortcuts are 1x1 convs.
With ``low_rank=True`` every conv except the stem is factorized and the classifier stays dense,
the usual choice for low-rank CNNs (the first and last layers are small and sensitive).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ElasticModel, image_cfg
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


class SlimResNet(ElasticModel):
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
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_subnets: Iterable[dict] = (),
    ):
        space = Space("stage", len(layers), ("width",), low_rank, depths=tuple(layers))
        super().__init__(space=space, low_rank=low_rank, widths=widths, ranks=ranks, max_member=max_member, extra_subnets=extra_subnets)
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        stem_kind, divisor = stem, (4 if stem == "cifar" else 8)
        f = self._layer_factory(divisor)
        self.num_classes, self.in_chans = num_classes, in_chans

        first = f.at(0)  # the stem's channels are the first stage's (its blocks add to them)
        stem_dim = first.dim(channels[0])
        if stem_kind == "cifar":
            conv = first.conv(fixed(in_chans), stem_dim, 3, factorize=False)
            self.stem = nn.Sequential(conv, first.bn(stem_dim), nn.ReLU(inplace=True))
        else:
            conv = first.conv(fixed(in_chans), stem_dim, 7, stride=2, factorize=False)
            self.stem = nn.Sequential(conv, first.bn(stem_dim), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))

        in_dim, stages = stem_dim, []
        for i, planes in enumerate(channels):
            g = f.at(i)
            blocks = {}
            for j in range(self.max_values["depth"][i]):  # a sliced member holds only its blocks
                blocks[j] = block_cls(g, in_dim, planes, 2 if (j == 0 and i > 0) else 1)
                in_dim = g.dim(planes * block_cls.expansion)
            stages.append(ElasticBlocks(blocks, "depth", i))
        self.stages = nn.Sequential(*stages)
        self._feature_dim = in_dim
        self.fc = f.linear(in_dim, fixed(num_classes), factorize=False)
        self.pretrained_cfg = image_cfg(in_chans, img_size, num_classes, "stem.0", "fc")
        self._finish_init()

    @property
    def num_features(self) -> int:
        """Channels ``forward_features`` returns: the active member's, as timm reads it."""
        return self._feature_dim.count_in(self._active_values)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self._replace_classifier("fc", self._factory.linear(self._feature_dim, fixed(num_classes), factorize=False), num_classes)


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
