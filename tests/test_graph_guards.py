"""Graph families of models whose dependency graph Torch-Pruning reads wrongly or not at all.

Each small model reproduces one timm architecture's pattern (SHViT, Sequencer, DPN) that made
the conversion fail; zoo leaves those channels unmapped or whole, and what stays elastic is
still exact: the full member is the model, the half member is its slice.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import zoo
from zoo.models import _graph_plan, _tp_patches, graph

IMG, CLASSES = 32, 10


class _Small(nn.Module):
    def __init__(self, arch: str, num_classes: int, in_chans: int):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = {"architecture": arch, "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> nn.Module:
        return self.fc


class _PartialAttention(_Small):
    """SHViT's single-head attention on the first channels of a split, reshaped back to an image:
    Torch-Pruning counts 0 channels on one side of that reshape and divided by it."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__("zoo_test_partial_attention", num_classes, in_chans)
        self.stem, self.qkv = nn.Conv2d(in_chans, 16, 3, padding=1), nn.Conv2d(8, 24, 1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.mlp1, self.mlp2, self.fc = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1), nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        b, _, h, w = x.shape
        x1, x2 = x.split([8, 8], dim=1)
        q, k, v = (t.flatten(2) for t in self.qkv(x1).split([8, 8, 8], dim=1))
        x1 = (v @ (q.transpose(-1, -2) @ k).softmax(-1).transpose(-1, -2)).reshape(b, 8, h, w)
        x = x + self.proj(torch.cat([x1, x2], 1))
        x = x + self.mlp2(self.mlp1(x).relu())
        return self.fc(x.mean((2, 3)))


class _TwoReaders(_Small):
    """Sequencer's bidirectional LSTM: its outputs outnumber the pieces Torch-Pruning splits them
    into, and the reader past the last piece got an empty offset (IndexError)."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__("zoo_test_two_readers", num_classes, in_chans)
        self.stem, self.rnn = nn.Conv2d(in_chans, 16, 4, stride=4), nn.LSTM(16, 8, batch_first=True, bidirectional=True)
        self.proj, self.mlp1, self.mlp2 = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.proj(self.rnn(x)[0])
        x = x + self.mlp2(self.mlp1(x).relu())
        return self.fc(x.mean(1))


class _DualPath(_Small):
    """DPN's dual path: a residual part (the first channels) and a dense part carried as one
    tensor and sliced apart in every block. The half member fails at an add right after a layer
    with no channels of its own (``act``), so no group can be blamed by that layer's name."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__("zoo_test_dual_path", num_classes, in_chans)
        self.stem, self.proj = nn.Conv2d(in_chans, 16, 3, padding=1), nn.Conv2d(16, 24, 1)
        self.a1, self.c11, self.c12 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 1)
        self.a2, self.c21, self.c22 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 1)
        self.act, self.fc = nn.ReLU(), nn.Linear(40, num_classes)

    def block(self, x: torch.Tensor, x_s: torch.Tensor, a: nn.Module, c1: nn.Module, c2: nn.Module) -> torch.Tensor:
        h = a(x).relu()
        out1, out2 = c1(h), self.act(c2(h))
        return torch.cat([x_s[:, :16] + out1, x_s[:, 16:], out2], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        x = self.block(x, self.proj(x), self.a1, self.c11, self.c12)
        x = self.block(x, x, self.a2, self.c21, self.c22)
        return self.fc(x.relu().mean((2, 3)))


class _GroupedConv(_Small):
    """RegNet's bottleneck: a 3x3 conv in 7 groups of 8 channels, whose outputs round to
    multiples of 8 (28 channels at half width became 32, not a multiple of 7)."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__("zoo_test_grouped_conv", num_classes, in_chans)
        self.stem, self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1), nn.Conv2d(16, 56, 1)
        self.conv2, self.conv3 = nn.Conv2d(56, 56, 3, padding=1, groups=7), nn.Conv2d(56, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        x = x + self.conv3(self.conv2(self.conv1(x).relu()).relu())
        return self.fc(x.mean((2, 3)))


@timm.models.register_model
def zoo_test_grouped_conv(pretrained: bool = False, **kwargs) -> _GroupedConv:
    return _GroupedConv(**kwargs)


@timm.models.register_model
def zoo_test_partial_attention(pretrained: bool = False, **kwargs) -> _PartialAttention:
    return _PartialAttention(**kwargs)


@timm.models.register_model
def zoo_test_two_readers(pretrained: bool = False, **kwargs) -> _TwoReaders:
    return _TwoReaders(**kwargs)


@timm.models.register_model
def zoo_test_dual_path(pretrained: bool = False, **kwargs) -> _DualPath:
    return _DualPath(**kwargs)


def _exact_family(name: str):
    torch.manual_seed(0)
    source = timm.create_model(name).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 3, IMG, IMG, generator=generator) for _ in range(2)]
    family = zoo.from_timm(source, img_size=IMG, widths=[0.5], calibration=calibration).eval()
    x = torch.randn(2, 3, IMG, IMG, generator=generator)
    family.set_member(width=1.0)
    assert (family(x) - source(x)).abs().max().item() <= 1e-5
    family.set_member(width=0.5)
    assert (zoo.slice(family, width=0.5)(x) - family(x)).abs().max().item() <= 1e-5
    return family


@pytest.mark.parametrize(
    "name, elastic",
    [("zoo_test_partial_attention", ("mlp1", 32)), ("zoo_test_two_readers", ("mlp1", 32))],
)
@torch.no_grad()
def test_a_reshape_or_split_torch_pruning_cannot_map_leaves_the_rest_elastic(name, elastic, monkeypatch):
    # the LSTM's group searches never end: a lower bound ends them sooner, with the same groups
    monkeypatch.setattr(_tp_patches, "GROUP_LIMIT", 2_000)
    monkeypatch.setattr(graph, "_PLANS", type(graph._PLANS)())
    family = _exact_family(name)
    assert list(elastic) in [list(g) for g in family.model_args["groups"]]
    assert family.zoo_metadata["converted_from"]["fixed_groups"]  # what stays whole is said


@torch.no_grad()
def test_a_grouped_convs_outputs_round_to_a_multiple_of_its_groups():
    family = _exact_family("zoo_test_grouped_conv")  # the half member runs: 28 channels, not 32
    member = zoo.slice(family, width=0.5)
    assert member.net.conv2.out_channels == 28 and member.net.conv2.groups == 7


@torch.no_grad()
def test_a_failure_no_layer_name_explains_is_traced_to_its_group_by_bisection(monkeypatch):
    family = _exact_family("zoo_test_dual_path")
    fixed = family.zoo_metadata["converted_from"]["fixed_groups"]
    assert any(f.startswith("c22: the layer act") for f in fixed), fixed
    assert [g[0] for g in family.model_args["groups"]] == ["a2", "a1", "stem"]

    monkeypatch.setattr(graph, "_PLANS", type(graph._PLANS)())  # traced again, not the plan above
    monkeypatch.setattr(_graph_plan.ChannelPlan, "_culprit", lambda self, example, progress: set())
    with pytest.raises(zoo.convert.UnsupportedModel, match="the layer act"):
        zoo.from_timm(timm.create_model("zoo_test_dual_path"), img_size=IMG, widths=[0.5], order="none")


@pytest.mark.slow
def test_a_concatenation_counted_through_a_split_with_more_readers_than_pieces_converts():
    """Gemma 4's patch reshapes: counting a concatenation's channels, Torch-Pruning looked a
    split's piece up past the last one (IndexError); that concatenation stays unmapped."""
    plan = graph._plan("gemma4_vit_167m_enc", {"img_size": 96}, CLASSES, 3, 96)
    assert len(plan.groups) >= 16  # at least each block's MLP hidden channels
