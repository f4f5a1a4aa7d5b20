"""Width-slimmable (and optionally low-rank) MobileNetV2.

MobileNetV2 (Sandler et al. 2018): a 3x3 stride-2 stem of 32 channels, seventeen inverted
residual blocks (1x1 expansion by ``t``, 3x3 depthwise, linear 1x1 projection), a 1x1 conv to
1280 features, global pooling, dropout and a linear classifier; batch norm and ReLU6.

Every channel count is elastic with divisor 8 (Slimmable MobileNetV2), including each block's
expanded channels, which are ``in_channels * t`` of the block's *full-width* input and shrink
with width. The final conv's 1280 outputs stay fixed at every width, as the paper does for
width multipliers below one, so the classifier always sees 1280 features. ``stem_channels``,
``settings`` and ``head_features`` build timm's other MobileNetV2s (``mobilenetv2_050``,
``mobilenetv2_110d``...), whose multipliers change channel counts and repeats.
With ``low_rank=True`` every non-depthwise conv except the stem is factorized (depthwise convs
have nothing to factorize) and the classifier stays dense.
As a backbone its features are timm's for ``mobilenetv2_100``: the ends of stages 0, 1, 2, 4
and 6 (reductions 2 to 32), at the active member's widths; the final 1x1 conv is the "norm"
that ``prune_intermediate_layers`` drops.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from timm.models._efficientnet_blocks import InvertedResidual as TimmInvertedResidual
from timm.models._features import feature_take_indices
from timm.models.efficientnet import EfficientNet
from torch import nn

from ..base import ImageModel, check_nchw, image_cfg
from ..convert import Plan, converts, is_type, kind, refuse, require, require_avg_pool, require_linear_head
from ..importance import Coupling, out_units
from ..layers import ElasticBlocks, LayerFactory
from ..space import DEFAULT_GRID, Dim, Space, channel_divisor, fixed
from ._builder import build, register_family

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_FEATURES = 1280


def conv_kaiming_normal(weight: torch.Tensor) -> None:
    """The conv initialisation of the reference implementations (He normal, fan-out)."""
    nn.init.kaiming_normal_(weight, mode="fan_out")


def classifier_normal(weight: torch.Tensor) -> None:
    nn.init.normal_(weight, 0.0, 0.01)


def _conv_bn_act(f: LayerFactory, in_dim: Dim, out_dim: Dim, kernel_size: int, **kwargs) -> nn.Sequential:
    conv = f.conv(in_dim, out_dim, kernel_size, init=conv_kaiming_normal, **kwargs)
    return nn.Sequential(conv, f.bn(out_dim), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1), filter (3x3 depthwise), project (1x1, no activation); add if shapes match."""

    def __init__(self, f: LayerFactory, in_dim: Dim, out_dim: Dim, stride: int, expansion: int):
        super().__init__()
        hidden = f.dim(in_dim.units * expansion)
        self.expand = _conv_bn_act(f, in_dim, hidden, 1) if expansion != 1 else None
        self.depthwise = _conv_bn_act(f, hidden, hidden, 3, stride=stride, depthwise=True)
        self.project = f.conv(hidden, out_dim, 1, init=conv_kaiming_normal)
        self.bn = f.bn(out_dim)
        self.use_residual = stride == 1 and in_dim == out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.bn(self.project(self.depthwise(out)))
        return x + out if self.use_residual else out


class SlimMobileNetV2(ImageModel):
    """A MobileNetV2 whose every channel count (and, if low-rank, every 1x1 conv's rank) is
    elastic, except the 1280 features before the classifier."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        global_pool: str = "avg",
        drop_rate: float = 0.2,
        stem_channels: int = STEM_CHANNELS,
        settings: Iterable[Iterable[int]] = INVERTED_RESIDUAL_SETTINGS,
        head_features: int = HEAD_FEATURES,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_members: Iterable[dict] = (),
        round_channels: int | None = None,
    ):
        settings = tuple(tuple(int(v) for v in row) for row in settings)  # (t, c, n, s) per stage; other multipliers
        depths = tuple(repeats for _, _, repeats, _ in settings)
        space = Space("stage", len(depths), ("width",), low_rank, depths=depths)
        super().__init__(
            space=space,
            low_rank=low_rank,
            widths=widths,
            ranks=ranks,
            max_member=max_member,
            extra_members=extra_members,
        )
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate:g}")
        f = self._layer_factory(channel_divisor(round_channels, 8))
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate

        first = f.at(0)  # the stem's channels are the first stage's (its depthwise conv reads them)
        stem_dim = first.dim(stem_channels)
        self.stem = _conv_bn_act(first, fixed(in_chans), stem_dim, 3, stride=2, factorize=False)
        in_dim, stages, reduction = stem_dim, [], 2
        self._taps, self._stage_ends = [], []  # a feature ends each stage before a stride 2, and the last
        strides = [stride for *_, stride in settings] + [2]
        for i, (expansion, channels, _, stride) in enumerate(settings):
            g, blocks = f.at(i), {}
            for j in range(self.max_values["depth"][i]):  # a sliced member holds only its blocks
                out_dim = g.dim(channels)
                blocks[j] = InvertedResidual(g, in_dim, out_dim, stride if j == 0 else 1, expansion)
                in_dim = out_dim
            stages.append(ElasticBlocks(blocks, "depth", i))
            reduction *= stride
            if strides[i + 1] == 2:
                self._taps.append((in_dim, reduction, f"blocks.{i}"))
                self._stage_ends.append(i)
        self.blocks = nn.Sequential(*stages)
        self._feature_dim = fixed(head_features)
        self.final_conv = _conv_bn_act(f, in_dim, self._feature_dim, 1)
        self.global_pool = self._pool(global_pool)
        self.classifier = self._new_classifier(num_classes)
        pool_size = (-(-img_size // reduction),) * 2
        self.pretrained_cfg = image_cfg(in_chans, img_size, num_classes, "stem.0", "classifier", pool_size=pool_size)
        self._finish_init()

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return self._classifier(self._feature_dim, num_classes, init=classifier_normal)

    @property
    def num_features(self) -> int:
        """Channels ``forward_features`` returns (1280, or a feature's after pruning)."""
        return self._feature_dim.count_in(self._active_values)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.dropout(self.global_pool(x), self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

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
        final features (after the final conv once every stage ran). ``norm`` is unused, as in
        timm's MobileNets."""
        check_nchw(output_fmt)
        take, last = feature_take_indices(len(self._taps), indices)
        take_stages = {self._stage_ends[i] for i in take}
        stages = self.blocks[: self._stage_ends[last] + 1] if stop_early else self.blocks
        x = self.stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_stages:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return (self.final_conv(x) if len(stages) == len(self.blocks) else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's: drop the stages after the last feature ``indices`` needs; the final conv
        goes with them, with the head or with the norm. Returns the absolute indices."""
        take, last = feature_take_indices(len(self._taps), indices)
        last_stage = self._stage_ends[last]
        for i in range(last_stage + 1, len(self.blocks)):
            self.blocks[i] = nn.Sequential()  # runs as the identity
        prune_end = prune_norm or prune_head or last_stage < len(self.blocks) - 1
        if prune_end:  # the features now end at the last tap, and the head was sized for the final ones
            self.final_conv = nn.Identity()
            self._feature_dim = self._taps[last][0]
            self.reset_classifier(0, "")
        return take

    def couplings(self) -> list[Coupling]:
        """The stream between residual additions (a stage's blocks after the first add to it),
        and each block's expanded channels (the expansion conv, the depthwise conv and their
        batch norms, read by the projection)."""
        stem_conv, stem_bn = self.stem[0], self.stem[1]
        stream = Coupling("stem", out_units(stem_conv), writers=[stem_conv], norms=[stem_bn])
        found = [stream]
        for i, stage in enumerate(self.blocks):
            for j, block in enumerate(stage.values()):
                dw_conv, dw_bn = block.depthwise[0], block.depthwise[1]
                if block.expand is None:  # the depthwise conv filters the stream itself
                    hidden = stream
                else:
                    expand, norm = block.expand[0], block.expand[1]
                    stream.readers.append(expand)
                    hidden = Coupling(f"blocks.{i}.{j} expanded", out_units(expand), writers=[expand], norms=[norm])
                    found.append(hidden)
                hidden.depthwise.append(dw_conv)
                hidden.norms.append(dw_bn)
                hidden.readers.append(block.project)
                if not block.use_residual:
                    stream = Coupling(f"blocks.{i}.{j} output", out_units(block.project))
                    found.append(stream)
                stream.writers.append(block.project)
                stream.norms.append(block.bn)
        stream.readers.append(self.final_conv[0])
        return found

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.global_pool = self._pool(self.global_pool.pool_type if global_pool is None else global_pool)
        self._replace_classifier("classifier", self._new_classifier(num_classes), num_classes)


@register_family("mobilenetv2", SlimMobileNetV2)
def slim_mobilenetv2(pretrained: bool = False, **kwargs) -> SlimMobileNetV2:
    """MobileNetV2 1.0 (3.50 M parameters with 1000 classes, as torchvision's)."""
    return build("slim_mobilenetv2", pretrained, kwargs)


# ----- conversion from timm's MobileNetV2s (zoo.from_timm) ------------------------------------
@converts(EfficientNet, "MobileNetV2")
def plan_from_timm(model: nn.Module, name: str) -> Plan:
    """How timm's MobileNetV2 (an ``EfficientNet`` of depthwise-separable and inverted
    residual blocks) becomes zoo's; refuses the first part zoo's does not compute."""
    require(is_type(model, EfficientNet), name, f"the {kind(model)} architecture")
    require(
        is_type(model.conv_stem, nn.Conv2d)
        and model.conv_stem.kernel_size == (3, 3)
        and model.conv_stem.stride == (2, 2),
        name,
        "a stem other than a 3x3 stride-2 conv",
    )
    _require_bn_act(model.bn1, nn.ReLU6, "bn1", name)
    require(is_type(model.conv_head, nn.Conv2d), name, f"the head {kind(model.conv_head)}")
    _require_bn_act(model.bn2, nn.ReLU6, "bn2", name)
    require_avg_pool(model, name)
    require_linear_head(model, name, "classifier")
    plan = Plan(name, "slim_mobilenetv2", {}, [("stem.0", "conv_stem"), ("stem.1", "bn1")])
    settings, in_chs = [], model.conv_stem.out_channels
    for i, stage in enumerate(model.blocks):
        rows = []
        for j, b in enumerate(stage):
            expansion, out = _plan_block(plan, b, f"blocks.{i}.{j}", in_chs, name)
            # zoo adds where a stage's width feeds itself: stride 1, same width, inside a stage (or the stem's)
            adds = b.conv_dw.stride == (1, 1) and in_chs == out and (j > 0 or i == 0)
            require(b.has_skip == adds, name, f"the residual connection of blocks.{i}.{j}")
            rows.append((expansion, out, b.conv_dw.stride[0]))
            in_chs = out
        first = rows[0]
        require(
            all(r[:2] == first[:2] and r[2] == 1 for r in rows[1:]),
            name,
            f"stage {i}, whose blocks differ in expansion, width or stride",
        )
        settings.append((first[0], first[1], len(rows), first[2]))
    plan.modules += [("final_conv.0", "conv_head"), ("final_conv.1", "bn2"), ("classifier", "classifier")]
    plan.args = {
        "num_classes": model.num_classes,
        "in_chans": model.conv_stem.in_channels,
        "drop_rate": float(model.drop_rate),
    }
    shape = {
        "stem_channels": (model.conv_stem.out_channels, STEM_CHANNELS),
        "settings": (tuple(settings), INVERTED_RESIDUAL_SETTINGS),
        "head_features": (model.conv_head.out_channels, HEAD_FEATURES),
    }
    plan.args.update(
        {k: ([list(s) for s in v] if k == "settings" else v) for k, (v, default) in shape.items() if v != default}
    )
    return plan


def _require_bn_act(bn: nn.Module, act: type, where: str, name: str) -> None:
    require(is_type(bn, BatchNormAct2d), name, f"the normalisation {kind(bn)} ({where})")
    require(is_type(bn.act, act) and is_type(bn.drop, nn.Identity), name, f"the activation {kind(bn.act)} ({where})")


def _plan_block(plan: Plan, b: nn.Module, at: str, in_chs: int, name: str) -> tuple[int, int]:
    """Add the (zoo, timm) module pairs of block ``at`` (the same name in both) to ``plan``;
    returns its expansion and output channels."""
    require(is_type(b.se, nn.Identity), name, f"squeeze-excitation ({at}.se)")
    require(is_type(b.aa, nn.Identity), name, f"anti-aliased downsampling ({at}.aa)")
    kernel = b.conv_dw.kernel_size
    require(
        kernel == (3, 3) and b.conv_dw.dilation == (1, 1),
        name,
        f"the {kernel[0]}x{kernel[1]} depthwise kernel of {at} (MobileNetV2 uses 3x3)",
    )
    if is_type(b, DepthwiseSeparableConv):
        _require_bn_act(b.bn1, nn.ReLU6, f"{at}.bn1", name)
        _require_bn_act(b.bn2, nn.Identity, f"{at}.bn2", name)
        parts = [("depthwise.0", "conv_dw"), ("depthwise.1", "bn1"), ("project", "conv_pw"), ("bn", "bn2")]
        plan.modules += [(f"{at}.{ours}", f"{at}.{theirs}") for ours, theirs in parts]
        return 1, b.conv_pw.out_channels
    if is_type(b, TimmInvertedResidual):
        _require_bn_act(b.bn1, nn.ReLU6, f"{at}.bn1", name)
        _require_bn_act(b.bn2, nn.ReLU6, f"{at}.bn2", name)
        _require_bn_act(b.bn3, nn.Identity, f"{at}.bn3", name)
        mid, out = b.conv_pw.out_channels, b.conv_pwl.out_channels
        expansion = mid // in_chs
        require(
            mid == in_chs * expansion,
            name,
            f"the expanded width {mid} of {at} (not a whole multiple of its {in_chs} inputs)",
        )
        parts = [("expand.0", "conv_pw"), ("expand.1", "bn1"), ("depthwise.0", "conv_dw")]
        parts += [("depthwise.1", "bn2"), ("project", "conv_pwl"), ("bn", "bn3")]
        plan.modules += [(f"{at}.{ours}", f"{at}.{theirs}") for ours, theirs in parts]
        return expansion, out
    raise refuse(name, f"the block type {kind(b)} ({at})")
