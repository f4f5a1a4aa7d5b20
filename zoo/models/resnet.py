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
from timm.models import resnet as timm_resnet
from timm.models._features import feature_take_indices
from torch import nn

from ..base import ImageModel, check_nchw, image_cfg
from ..convert import Plan, converts, is_type, kind, require, require_avg_pool, require_linear_head
from ..importance import Coupling, out_units
from ..layers import ElasticBlocks, LayerFactory
from ..registry import variants
from ..space import DEFAULT_GRID, Dim, Space, channel_divisor, fixed
from ._builder import build, register_family


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
        extra_members: Iterable[dict] = (),
        round_channels: int | None = None,
    ):
        space = Space("stage", len(layers), ("width",), low_rank, depths=tuple(layers))
        super().__init__(
            space=space,
            low_rank=low_rank,
            widths=widths,
            ranks=ranks,
            max_member=max_member,
            extra_members=extra_members,
        )
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        stem_kind = stem
        f = self._layer_factory(channel_divisor(round_channels, 4 if stem == "cifar" else 8))
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

    def couplings(self) -> list[Coupling]:
        """A stage's residual channels (every block's last conv and batch norm, the stage's
        downsampling shortcut, and for basic blocks in stage 0 the stem: they are added together)
        are one coupling, read by every block's first conv, the next stage's shortcut and the
        classifier; each block's inner channels are their own (two in a bottleneck)."""
        stem_conv, stem_bn = self.stem[0], self.stem[1]
        stream = Coupling("stem", out_units(stem_conv), writers=[stem_conv], norms=[stem_bn])
        found = [stream]
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage.values()):
                convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
                bns = [block.bn1, block.bn2] + ([block.bn3] if hasattr(block, "bn3") else [])
                for k, (conv, bn) in enumerate(zip(convs[:-1], bns[:-1])):
                    name = f"stages.{i}.{j} inner {k + 1}"
                    found.append(Coupling(name, out_units(conv), writers=[conv], norms=[bn], readers=[convs[k + 1]]))
                stream.readers.append(block.conv1)
                if block.shortcut is not None:
                    stream.readers.append(block.shortcut[0])
                    shortcut, norm = block.shortcut[0], block.shortcut[1]
                    stream = Coupling(f"stages.{i} residual", out_units(shortcut), writers=[shortcut], norms=[norm])
                    found.append(stream)
                elif stream.name == "stem":
                    stream.name = f"stem and stages.{i} residual"
                stream.writers.append(convs[-1])
                stream.norms.append(bns[-1])
        stream.readers.append(self.fc)
        return found

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.global_pool = self._pool(self.global_pool.pool_type if global_pool is None else global_pool)
        self._replace_classifier("fc", self._classifier(self._feature_dim, num_classes), num_classes)


def _cifar(depth: int) -> dict:
    n = (depth - 2) // 6
    return dict(block="basic", layers=(n, n, n), channels=(16, 32, 64), stem="cifar")


def _imagenet(block: str, layers: tuple[int, ...]) -> dict:
    return dict(block=block, layers=layers, channels=(64, 128, 256, 512), stem="imagenet")


_CIFAR_DEFAULTS = {"num_classes": 10, "img_size": 32}


@register_family("resnet", SlimResNet, _cifar(20), _CIFAR_DEFAULTS)
def slim_resnet20(pretrained: bool = False, **kwargs) -> SlimResNet:
    """CIFAR ResNet-20 (0.27 M parameters at width 1.0)."""
    return build("slim_resnet20", pretrained, kwargs)


@register_family("resnet", SlimResNet, _cifar(56), _CIFAR_DEFAULTS)
def slim_resnet56(pretrained: bool = False, **kwargs) -> SlimResNet:
    """CIFAR ResNet-56 (0.85 M parameters at width 1.0)."""
    return build("slim_resnet56", pretrained, kwargs)


@register_family("resnet", SlimResNet, _imagenet("basic", (2, 2, 2, 2)))
def slim_resnet18(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-18 with basic blocks."""
    return build("slim_resnet18", pretrained, kwargs)


@register_family("resnet", SlimResNet, _imagenet("bottleneck", (3, 4, 6, 3)))
def slim_resnet50(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-50 with bottleneck blocks."""
    return build("slim_resnet50", pretrained, kwargs)


@register_family("resnet", SlimResNet, _imagenet("basic", (3, 4, 6, 3)))
def slim_resnet34(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-34 with basic blocks (timm's ``resnet34``)."""
    return build("slim_resnet34", pretrained, kwargs)


@register_family("resnet", SlimResNet, _imagenet("bottleneck", (3, 4, 23, 3)))
def slim_resnet101(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-101 with bottleneck blocks (timm's ``resnet101``)."""
    return build("slim_resnet101", pretrained, kwargs)


@register_family("resnet", SlimResNet, _imagenet("bottleneck", (3, 8, 36, 3)))
def slim_resnet152(pretrained: bool = False, **kwargs) -> SlimResNet:
    """ImageNet ResNet-152 with bottleneck blocks (timm's ``resnet152``)."""
    return build("slim_resnet152", pretrained, kwargs)


# ----- conversion from timm's ResNets (zoo.from_timm) -----------------------------------------
def _imagenet_layouts() -> dict[tuple[str, tuple[int, ...]], str]:
    """(block, layers) -> the ImageNet variant zoo has with that layout."""
    found = {}
    for v in variants(SlimResNet):
        if v.fixed_args["stem"] == "imagenet":
            found[(v.fixed_args["block"], tuple(v.fixed_args["layers"]))] = v.name
    return found


def _by_depth(layouts: dict[tuple[str, tuple[int, ...]], str]) -> list[str]:
    return [name for _, name in sorted(layouts.items(), key=lambda kv: (sum(kv[0][1]), kv[0][0]))]


@converts(timm_resnet.ResNet, "ResNets with basic or bottleneck blocks and the plain stem")
def plan_from_timm(model: nn.Module, name: str) -> Plan:
    """How timm's ResNet becomes a zoo ResNet; refuses the first part zoo's does not compute."""
    require(is_type(model, timm_resnet.ResNet), name, f"the {kind(model)} architecture")
    convs_in_stem = sum(isinstance(m, nn.Conv2d) for m in model.conv1.modules())
    require(
        is_type(model.conv1, nn.Conv2d),
        name,
        f"the deep stem ({kind(model.conv1)} of {convs_in_stem} convs, as in resnet*d/t/s)",
    )
    require(
        model.conv1.kernel_size == (7, 7) and model.conv1.out_channels == 64,
        name,
        f"a {model.conv1.kernel_size[0]}x{model.conv1.kernel_size[1]} stem of {model.conv1.out_channels} channels",
    )
    require(is_type(model.act1, nn.ReLU), name, f"the activation {kind(model.act1)}")
    require(is_type(model.maxpool, nn.MaxPool2d), name, f"the stem pooling {kind(model.maxpool)}")
    require_avg_pool(model, name)
    require_linear_head(model, name, "fc")
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    kinds = {type(b) for s in stages for b in s}
    require(
        kinds in ({timm_resnet.BasicBlock}, {timm_resnet.Bottleneck}),
        name,
        f"the block type {', '.join(sorted(k.__name__ for k in kinds))}",
    )
    block = "basic" if kinds == {timm_resnet.BasicBlock} else "bottleneck"
    layers = tuple(len(s) for s in stages)
    layouts = _imagenet_layouts()
    arch = layouts.get((block, layers))
    require(arch is not None, name, f"the layout {layers} of {block} blocks (zoo has {', '.join(_by_depth(layouts))})")
    plan = Plan(
        name,
        arch,
        {"num_classes": model.num_classes, "in_chans": model.conv1.in_channels},
        [("stem.0", "conv1"), ("stem.1", "bn1")],
    )
    for i, stage in enumerate(stages):
        for j, b in enumerate(stage):
            plan.modules += _plan_block(b, block, f"layer{i + 1}.{j}", f"stages.{i}.{j}", name)
    plan.modules.append(("fc", "fc"))
    return plan


def _plan_block(b: nn.Module, block: str, at: str, ours: str, name: str) -> list[tuple[str, str]]:
    """(zoo module, timm module) pairs of one timm block ``at``, zoo's ``ours``."""
    require(b.se is None, name, f"squeeze-excitation ({at}.se)")
    require(is_type(b.aa, nn.Identity), name, f"anti-aliased downsampling ({at}.aa)")
    acts = [b.act1, b.act2] + ([b.act3] if block == "bottleneck" else [])
    require(
        all(is_type(a, nn.ReLU) for a in acts),
        name,
        lambda: f"the activation {kind(next(a for a in acts if not is_type(a, nn.ReLU)))} in {at}",
    )
    convs = ["conv1", "conv2"] + (["conv3"] if block == "bottleneck" else [])
    if block == "bottleneck":
        planes = b.conv3.out_channels // 4
        require(
            b.conv2.groups == 1, name, f"grouped convolutions ({at}.conv2 has {b.conv2.groups} groups, as in ResNeXt)"
        )
        require(
            b.conv1.out_channels == planes,
            name,
            f"the bottleneck width {b.conv1.out_channels} of {at} (wide ResNets; zoo's is {planes})",
        )
    modules = []
    if b.downsample is not None:
        ds = b.downsample
        require(
            isinstance(ds, nn.Sequential) and len(ds) == 2 and is_type(ds[0], nn.Conv2d),
            name,
            f"the downsampling shortcut of {at} ({' + '.join(kind(m) for m in ds)}, e.g. average-pool downsampling)",
        )
        modules += [(f"{ours}.shortcut.0", f"{at}.downsample.0"), (f"{ours}.shortcut.1", f"{at}.downsample.1")]
    for k, conv in enumerate(convs, 1):
        modules += [(f"{ours}.{conv}", f"{at}.{conv}"), (f"{ours}.bn{k}", f"{at}.bn{k}")]
    return modules
