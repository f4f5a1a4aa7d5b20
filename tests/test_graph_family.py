"""The graph family: a timm model no hand-written family covers, end to end.

A real timm ``resnet10t`` (deep stem, avg-pool shortcuts: the ResNet planner refuses it) with
trained-looking batch norm, at 32 px and 10 classes, becomes a family through ``zoo.from_timm``;
its members train with masked optimizer steps, slice to standalone timm models with physically
fewer channels, save, load and export. Heavier models (EfficientNet, ConvNeXt, SE-ResNeXt) are
``slow``; ``benchmarks/timm_coverage.py`` runs one model of every timm module.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from training.masking import MaskCache, masked_step
from zoo.models.graph import GraphFamily

IMG, CLASSES = 32, 10
runner = CliRunner()


def trained_looking(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=CLASSES, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5), m.bias.normal_(0, 0.1)
    return model.eval()


def batches(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, IMG, IMG, generator=generator) for _ in range(n)]


@pytest.fixture(scope="module")
def converted() -> tuple[torch.nn.Module, GraphFamily]:
    source = trained_looking("resnet10t")
    family = zoo.from_timm(source, img_size=IMG, widths=[0.5], calibration=batches(), order="activation")
    return source, family


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_the_full_member_is_the_timm_model_and_zoo_says_which_family(converted):
    source, family = converted
    assert isinstance(family, GraphFamily) and family.arch == "timm_graph"
    assert family.zoo_metadata["converted_from"]["family"] == "timm_graph"
    assert family.members == [zoo.Member(0.5), zoo.Member(1.0)] and family.axes == ("width",)
    x = batches(1, seed=5)[0]
    family.eval().set_member(width=1.0)
    assert _difference(family(x), source(x)) <= 1e-4
    family.set_member(width=0.5)
    assert _difference(family(x), source(x)) > 1e-3  # the member is another network


def test_a_masked_step_moves_only_the_member_and_the_member_is_its_slice(converted):
    family = copy.deepcopy(converted[1]).train()
    member = family.set_member(width=0.5, for_training=True)
    before = {n: p.detach().clone() for n, p in family.named_parameters()}
    optimizer = torch.optim.SGD(family.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for x in batches():  # two steps: momentum and weight decay would move what the member does not use
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(family(x), torch.arange(8) % CLASSES).backward()
        masked_step(optimizer, MaskCache(family).union([member]))
    masks = zoo.parameter_masks(family, member)
    moved = 0
    for name, p in family.named_parameters():
        mask = masks[name]
        assert torch.equal(p.detach()[~mask], before[name][~mask]), name  # bit for bit
        moved += int((p.detach()[mask] != before[name][mask]).any())
    assert moved > 10
    family.eval().set_member(member)
    sliced = zoo.slice(family, member)
    assert sum(p.numel() for p in sliced.parameters()) == sum(int(m.sum()) for m in masks.values())
    x = batches(1, seed=7)[0]
    assert _difference(sliced(x), family(x)) <= 1e-4
    assert isinstance(sliced.net, type(converted[0])) and sliced.net.fc.in_features < converted[0].fc.in_features


@torch.no_grad()
def test_a_member_per_group_recalibrates_and_slices(converted):
    family = copy.deepcopy(converted[1])
    groups = family.space()["groups"]
    member = zoo.Member(width=[0.25 if g % 2 else 0.75 for g in range(groups)])
    with pytest.raises(ValueError, match="no batch-norm statistics"):
        family.set_member(member)
    zoo.recalibrate_bn(family, batches(), member)
    family.eval().set_member(member)
    x = batches(1, seed=3)[0]
    assert _difference(zoo.slice(family, member)(x), family(x)) <= 1e-4


@torch.no_grad()
def test_files_rebuild_the_family_and_the_sliced_member_and_export_verifies(converted, tmp_path):
    from export.onnx_export import export_file
    from export.runtime import Predictor

    family = converted[1].eval()
    x = batches(1, seed=9)[0]
    family.set_member(width=0.5)
    expected = family(x)
    path = zoo.save(family, tmp_path / "family.safetensors", metadata=family.zoo_metadata)
    loaded = zoo.load(path).eval()
    assert loaded.model_args["timm_model"] == "resnet10t" and loaded.members == family.members
    loaded.set_member(width=0.5)
    assert torch.equal(loaded(x), expected)
    member = zoo.load(zoo.save(zoo.slice(family, width=0.5), tmp_path / "member.safetensors")).eval()
    assert torch.equal(member(x), expected)
    result = export_file(path, tmp_path / "member.onnx", width=0.5)  # verified against PyTorch on export
    assert result.path.is_file()
    logits = Predictor(result.path).run(x.numpy())
    assert abs(logits - expected.numpy()).max() <= 1e-4


def test_zoo_convert_and_info_name_the_graph_family(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["convert", "resnet10t", "--img-size", "32", "--num-classes", "10", "--out", "f.st"])
    assert result.exit_code == 0, result.output
    assert "into timm_graph" in result.output
    info = runner.invoke(app, ["info", "f.st"])
    assert info.exit_code == 0, info.output
    assert "timm_graph (family graph, image input)" in info.output and "from timm resnet10t" in info.output


class _Gate(torch.nn.Module):
    """Keeps as many rows as its input has positive values: a shape that depends on the data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : 1 + int((x > 0).sum()) % x.shape[2]]


class _DataDependent(torch.nn.Module):
    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.gate, self.fc = torch.nn.Conv2d(in_chans, 16, 3), _Gate(), torch.nn.Linear(16, num_classes)
        self.num_classes, self.pretrained_cfg = num_classes, {"classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.stem(x)).mean((2, 3)))


@timm.models.register_model
def zoo_test_data_dependent(pretrained: bool = False, **kwargs) -> _DataDependent:
    return _DataDependent(**kwargs)


def test_a_layer_the_graph_cannot_map_is_refused_by_name_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["convert", "zoo_test_data_dependent", "--img-size", "32", "--out", "x.safetensors"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot make a family of zoo_test_data_dependent: the layer gate cannot be traced" in result.output
    assert list(tmp_path.iterdir()) == []


class _Shuffled(torch.nn.Module):
    """A channel shuffle between two convs (ShuffleNet): the stem's channels reach the grouped
    conv in another order, which no per-axis index map describes."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.bn = torch.nn.Conv2d(in_chans, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.conv, self.bn2 = torch.nn.Conv2d(16, 32, 3, padding=1, groups=4), torch.nn.BatchNorm2d(32)
        self.fc = torch.nn.Linear(32, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"architecture": "zoo_test_channel_shuffle", "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x)).relu()
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(self.bn2(self.conv(x)).relu().mean((2, 3)))


@timm.models.register_model
def zoo_test_channel_shuffle(pretrained: bool = False, **kwargs) -> _Shuffled:
    return _Shuffled(**kwargs)


@torch.no_grad()
def test_a_group_the_graph_cannot_map_stays_at_full_width():
    """The shuffled stem channels stay whole (recorded, naming the tensor); the conv after the
    shuffle is elastic, and its member is its slice."""
    family = zoo.create_model("timm_graph", timm_model="zoo_test_channel_shuffle", num_classes=CLASSES, img_size=IMG)
    assert family._plan.fixed == ["stem: the tensor conv.weight (an index of its axis 1 holds several channels)"]
    assert family.model_args["groups"] == [["conv", 32]]
    zoo.recalibrate_bn(family, batches(1), width=0.5)
    family.eval().set_member(width=0.5)
    x = batches(1, seed=2)[0]
    assert _difference(zoo.slice(family, width=0.5)(x), family(x)) <= 1e-4


@torch.no_grad()
def test_an_order_that_would_change_the_model_is_not_applied():
    """The grouped conv's outputs cannot be reordered across its groups: conversion keeps timm's
    order there, says so, and stays exact."""
    source = trained_looking("zoo_test_channel_shuffle")
    family = zoo.from_timm(source, img_size=IMG, widths=[1.0], order="weight")
    assert family.zoo_metadata["converted_from"]["unordered_groups"] == ["conv"]
    assert family.zoo_metadata["converted_from"]["max_abs_diff"] <= 1e-5


class _CrossStage(torch.nn.Module):
    """timm's cross-stage partial stage (cspnet's cs3 models): a conv's output split in two,
    one half through a residual block, both concatenated again. Torch-Pruning cannot count the
    channels of the residual sum there."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.exp = torch.nn.Conv2d(in_chans, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 1)
        self.conv1, self.conv2 = torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 16, 3, padding=1)
        self.transition, self.fc = torch.nn.Conv2d(32, 32, 1), torch.nn.Linear(32, num_classes)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = {"architecture": "zoo_test_cross_stage", "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.exp(self.stem(x).relu()).relu().split(16, dim=1)
        x1 = self.conv2(self.conv1(x1).relu()).relu() + x1
        return self.fc(self.transition(torch.cat([x1, x2], 1)).relu().mean((2, 3)))


@timm.models.register_model
def zoo_test_cross_stage(pretrained: bool = False, **kwargs) -> _CrossStage:
    return _CrossStage(**kwargs)


@torch.no_grad()
def test_a_concatenation_whose_channels_torch_pruning_cannot_count_converts():
    """Torch-Pruning fails summing the channels it cannot count (int + None): zoo maps no
    channels through that concatenation, as Torch-Pruning does where it cannot count its output
    either; the groups there that no index map then describes stay at full width, and the
    member is still its slice."""
    source = trained_looking("zoo_test_cross_stage")
    family = zoo.from_timm(source, img_size=IMG, widths=[0.5], calibration=batches())
    assert family.zoo_metadata["converted_from"]["max_abs_diff"] <= 1e-5
    assert family.model_args["groups"]
    family.eval().set_member(width=0.5)
    x = batches(1, seed=2)[0]
    assert _difference(zoo.slice(family, width=0.5)(x), family(x)) <= 1e-4


class _GrownCache(torch.nn.Module):
    """An unsaved buffer the first forward grows to the input's size (convit's rel_indices)."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.conv = torch.nn.Conv2d(in_chans, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, num_classes)
        self.register_buffer("cache", torch.zeros(1, 1), persistent=False)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = {"architecture": "zoo_test_grown_cache", "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache.shape[1] != x.shape[-1]:
            self.cache = torch.linspace(0, 1, x.shape[-1], device=x.device).expand(1, -1).clone()
        x = self.conv(self.stem(x).relu()) * self.cache
        return self.fc(x.relu().mean((2, 3)))


@timm.models.register_model
def zoo_test_grown_cache(pretrained: bool = False, **kwargs) -> _GrownCache:
    return _GrownCache(**kwargs)


@torch.no_grad()
def test_a_cache_the_model_grew_is_sliced_as_it_is():
    source = trained_looking("zoo_test_grown_cache")
    family = zoo.from_timm(source, img_size=IMG, widths=[0.5], order="none")
    family.eval().set_member(width=0.5)
    x = batches(1, seed=2)[0]
    expected = family(x)
    assert family.net.cache.shape == (1, IMG)
    assert _difference(zoo.slice(family, width=0.5)(x), expected) <= 1e-5


class _Mix(torch.nn.Module):
    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return cls + x.mean(1, keepdim=True)


class _ClassToken(torch.nn.Module):
    """A class token expanded and handed to a layer (CaiT's class-attention blocks)."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.mix = torch.nn.Conv2d(in_chans, 16, 4, stride=4), _Mix()
        self.cls_token, self.fc = torch.nn.Parameter(torch.zeros(1, 1, 16)), torch.nn.Linear(16, num_classes)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = {"architecture": "zoo_test_class_token", "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.fc(self.mix(x, self.cls_token.expand(x.shape[0], -1, -1))[:, 0])


@timm.models.register_model
def zoo_test_class_token(pretrained: bool = False, **kwargs) -> _ClassToken:
    return _ClassToken(**kwargs)


def test_flops_count_a_parameter_view_handed_to_a_layer():
    """PyTorch's flop counter fails on a view of a parameter made without gradients (its module
    tracker finds no gradient function): zoo counts with gradients on, inside no_grad too."""
    family = zoo.from_timm(trained_looking("zoo_test_class_token"), img_size=IMG, widths=[0.5], order="none")
    expected = 2 * 16 * 48 * (IMG // 4) ** 2 + 2 * 16 * CLASSES  # the stem and the classifier
    with torch.no_grad():
        assert zoo.count_flops(family) == expected
    assert zoo.count_flops(family, 0.5) == expected // 2


class _EvalCache(torch.nn.Module):
    """A tensor cached in eval mode and dropped on train() (timm's attention-bias caches in
    efficientformer, levit, tiny_vit)."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.fc = torch.nn.Conv2d(in_chans, 16, 3, padding=1), torch.nn.Linear(16, num_classes)
        self.bias, self.cache = torch.nn.Parameter(torch.zeros(16)), {}
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = {"architecture": "zoo_test_eval_cache", "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def train(self, mode: bool = True):
        super().train(mode)
        self.cache = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * 2
        if not self.training:
            bias = self.cache.setdefault(str(x.device), bias)
        return self.fc((self.stem(x).mean((2, 3)) + bias).relu())


@timm.models.register_model
def zoo_test_eval_cache(pretrained: bool = False, **kwargs) -> _EvalCache:
    return _EvalCache(**kwargs)


def test_a_tensor_the_model_caches_in_eval_mode_does_not_stop_conversion():
    """Torch-Pruning traces in eval mode with gradients on: the cached tensor is no graph leaf,
    and copying the model failed; the model's mode is restored after tracing, which drops it."""
    family = zoo.from_timm(trained_looking("zoo_test_eval_cache").train(), img_size=IMG, widths=[0.5])
    assert family.zoo_metadata["converted_from"]["max_abs_diff"] <= 1e-5
    assert family.model_args["groups"] == [["stem", 16]]


class _PatchesAnySize(torch.nn.Module):
    """Embeds patches (its first conv is ``patch_embed``) and has no ``img_size`` argument."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3):
        super().__init__()
        self.patch_embed, self.fc = torch.nn.Conv2d(in_chans, 16, 4, stride=4), torch.nn.Linear(16, num_classes)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = {
            "architecture": "zoo_test_patches_any_size",
            "classifier": "fc",
            "first_conv": "patch_embed",
        }

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.patch_embed(x).relu().mean((2, 3)))


@timm.models.register_model
def zoo_test_patches_any_size(pretrained: bool = False, **kwargs) -> _PatchesAnySize:
    return _PatchesAnySize(**{k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans", "img_size")})


def test_a_model_that_embeds_patches_without_an_image_size_argument_converts():
    """timm's efficientvim: its first layer is ``patch_embed`` and it takes no ``img_size``."""
    family = zoo.from_timm(trained_looking("zoo_test_patches_any_size"), img_size=IMG, widths=[0.5])
    assert family.model_args["timm_args"] == {}
    assert family.pretrained_cfg["input_size"] == (3, IMG, IMG)


class _SharedLayer(torch.nn.Module):
    """One depthwise conv under two names (coat's position encodings shared across blocks)."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.fc = torch.nn.Conv2d(in_chans, 16, 3, padding=1), torch.nn.Linear(16, num_classes)
        self.first = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.second = self.first
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = {"architecture": "zoo_test_shared_layer", "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.first(x).relu()
        return self.fc((x + self.second(x)).mean((2, 3)))


@timm.models.register_model
def zoo_test_shared_layer(pretrained: bool = False, **kwargs) -> _SharedLayer:
    return _SharedLayer(**kwargs)


@torch.no_grad()
def test_a_layer_shared_under_two_names_saves_and_loads(tmp_path):
    """safetensors refuses tensors that share memory: each name is written, and loading fills
    the one tensor (the full family and its sliced member)."""
    family = zoo.from_timm(trained_looking("zoo_test_shared_layer"), img_size=IMG, widths=[0.5]).eval()
    x = batches(1, seed=2)[0]
    for width in (1.0, 0.5):
        model = zoo.slice(family, width=width).eval()
        loaded = zoo.load(zoo.save(model, tmp_path / "m.safetensors")).eval()
        assert loaded.net.first is loaded.net.second
        assert _difference(loaded(x), model(x)) == 0.0


class _UnitAttention(torch.nn.Module):
    """Attention within mask units, as Hiera's: queries, keys and values of five axes (batch,
    heads, units, tokens, head size); timm's ``fused_attn`` switch picks the fused kernel."""

    def __init__(self, num_classes: int = CLASSES, in_chans: int = 3, **kwargs):
        super().__init__()
        self.stem, self.qkv = torch.nn.Conv2d(in_chans, 32, 4, stride=4), torch.nn.Linear(32, 96)
        self.proj, self.fc = torch.nn.Linear(32, 32), torch.nn.Linear(32, num_classes)
        self.fused_attn, self.num_classes, self.in_chans = True, num_classes, in_chans
        self.pretrained_cfg = {"architecture": "zoo_test_unit_attention", "classifier": "fc", "first_conv": "stem"}

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (batch, 64, 32)
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, 4, n // 4, 3, 2, 16).permute(3, 0, 4, 1, 2, 5)  # 3 x (b, 2, 4, 16, 16)
        if self.fused_attn:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) * 16**-0.5).softmax(-1) @ v
        out = self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, n, 32))
        return self.fc(out.mean(1))


@timm.models.register_model
def zoo_test_unit_attention(pretrained: bool = False, **kwargs) -> _UnitAttention:
    return _UnitAttention(**kwargs)


@pytest.mark.slow  # two dynamo exports, 50 s: the suite's 10-minute budget
def test_attention_the_exporter_takes_only_written_out_exports_verified(tmp_path):
    """torch.onnx takes only four-axis queries in scaled_dot_product_attention: the member is
    exported with timm's attention written out (``fused_attn`` off while exporting, on again)
    and verified against PyTorch's fused forward."""
    from export.onnx_export import export_file

    family = zoo.from_timm(trained_looking("zoo_test_unit_attention"), img_size=IMG, widths=[0.5], order="none")
    path = zoo.save(zoo.slice(family, width=0.5), tmp_path / "m.safetensors")
    export_file(path, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 10_000 and family.net.fused_attn is True
    loaded = zoo.load(path).eval()
    import onnxruntime as ort

    x = batches(1, seed=3)[0]
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    assert _difference(torch.from_numpy(got), loaded(x)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["efficientnet_b0", "convnext_atto", "seresnext26t_32x4d", "mobilenetv3_small_050", "ghostnet_050"]
)
@torch.no_grad()
def test_other_timm_kinds_convert_exactly_and_slice(name):
    source = trained_looking(name)
    family = zoo.from_timm(source, img_size=IMG, widths=[0.5], calibration=batches()).eval()
    x = batches(1, seed=4)[0]
    family.set_member(width=1.0)
    assert _difference(family(x), source(x)) <= 1e-4
    family.set_member(width=0.5)
    assert _difference(zoo.slice(family, width=0.5)(x), family(x)) <= 1e-4


@pytest.mark.parametrize("limit, small", [("GROUP_LIMIT", 6), ("INDEX_LIMIT", 100)])
@torch.no_grad()
def test_a_group_search_that_does_not_end_leaves_its_root_whole(monkeypatch, limit, small):
    """Torch-Pruning's search grew one of RexNet's groups to millions of operations (Visformer's,
    to millions of indices): past either limit the root couples nothing, its channels stay whole
    (recorded in ``fixed``), and the other groups still make an exact family."""
    from zoo.models import _tp_patches, graph

    monkeypatch.setattr(_tp_patches, limit, small)  # the stem's and the shared trunk's groups reach further
    monkeypatch.setattr(graph, "_PLANS", type(graph._PLANS)())  # traced under this limit
    source = trained_looking("zoo_test_cross_stage")
    family = zoo.from_timm(source, img_size=IMG + 8, widths=[0.5], calibration=batches(), order="none")
    unbounded = [f for f in family._plan.fixed if "its group search did not end (over " in f]
    assert unbounded and family._plan.groups
    x = torch.randn(2, 3, IMG + 8, IMG + 8)
    family.eval().set_member(width=1.0)
    assert _difference(family(x), source(x)) <= 1e-4
    family.set_member(width=0.5)
    assert _difference(zoo.slice(family, width=0.5)(x), family(x)) <= 1e-4


@pytest.mark.slow
def test_a_five_axis_expand_that_is_not_grouped_query_attention_converts():
    """Torch-Pruning reads any five-axis expand as grouped-query attention; GCViT's global query
    is not one (its "repeat" is 0, and mapping divided by it): zoo leaves that expand unmapped."""
    from zoo.models.graph import _plan

    plan = _plan("gcvit_xxtiny", {"img_size": 224}, CLASSES, 3, 224)
    assert len(plan.groups) > 10
