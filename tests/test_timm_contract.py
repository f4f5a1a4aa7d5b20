"""The contract of timm's own model tests (tests/test_models.py of timm's sdist), written here
so that CI catches a regression without downloading timm's sources:
``benchmarks/timm_conformance.sh`` runs timm's file itself.

Unknown arguments are ``TypeError``s; every CNN family is a ``features_only`` backbone whose
channels follow the member; ``forward_intermediates`` and ``prune_intermediate_layers`` keep
timm's promises; sliced members and families at a member trace with ``torch.fx`` and script
with ``torch.jit``; a ViT built with ``dynamic_img_size`` takes other image sizes; a headless
model (``num_classes=0``, ``global_pool=''``) returns features. Tiny 32 px models throughout.
"""

from __future__ import annotations

import copy
import operator
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import zoo
from zoo.features import FeatureNet, features_only
from zoo.space import Member

CNNS = ["slim_resnet20", "slim_resnet18", "slim_mobilenetv2"]  # CIFAR and ImageNet stems, MobileNetV2
IMAGE = [*CNNS, "slim_vit_tiny"]
IMG = 32


def build(name: str, **kwargs):
    torch.manual_seed(0)
    return zoo.create_model(name, img_size=IMG, **kwargs)


def images(batch: int = 2, size: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_an_unknown_argument_is_timms_type_error_and_zoos_one_line_error():
    for create in (zoo.create_model, timm.create_model):
        with pytest.raises(
            TypeError, match="slim_resnet20: got an unexpected keyword argument 'not_a_model_arg'"
        ) as caught:
            create("slim_resnet20", not_a_model_arg=1)
        assert isinstance(caught.value, ValueError)  # zoo's user error: the CLI prints it as one line
    with pytest.raises(TypeError, match="not_a_model_arg"):  # the shipped weights too, before loading them
        timm.create_model("slim_resnet20.digits", pretrained=True, not_a_model_arg=1)
    with pytest.raises(TypeError, match="out_indices"):  # a features_only argument, without features_only
        zoo.create_model("slim_resnet20", out_indices=(1, 2))
    with pytest.raises(ValueError, match="feature_cls must be one of list, getter"):
        zoo.create_model("slim_resnet20", features_only=True, feature_cls="hook")
    with pytest.raises(ValueError, match="reads tokens, not images"):
        zoo.create_model("slim_gpt_nano", features_only=True, context_length=8)


@pytest.mark.parametrize("name", CNNS)
def test_features_only_backbone_follows_the_member_and_equals_the_sliced_member(name):
    backbone = build(name, features_only=True).eval()
    assert isinstance(backbone, FeatureNet) and isinstance(
        timm.create_model(name, features_only=True, out_indices=(1, 2), img_size=IMG), FeatureNet
    )
    x = images()
    channels = {}
    with torch.no_grad():
        for width in (1.0, 0.5):
            with zoo.use_member(backbone, width=width):
                features, info = backbone(x), backbone.feature_info
                assert info.channels() == [f.shape[1] for f in features]
                assert [-(-IMG // r) for r in info.reduction()] == [f.shape[-1] for f in features]
                channels[width] = info.channels()
        assert backbone.active_member == Member(1.0)  # zoo.use_member restored the member
        assert len(channels[1.0]) >= 3 and all(half < full for half, full in zip(channels[0.5], channels[1.0]))

        # the backbone at a member computes what that member, sliced out of the family, computes
        family = build(name).eval()  # the same weights: built from the same seed
        sliced = features_only(zoo.slice(family, width=0.5)).eval()
        assert sliced.feature_info.channels() == channels[0.5]
        backbone.set_member(width=0.5)
        for ours, theirs in zip(backbone(x), sliced(x)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    backbone.train().set_member(width=1.0)  # pruned after the last feature: every parameter is used
    sum(f.mean() for f in backbone(x)).backward()
    assert not [n for n, p in backbone.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", IMAGE)
@torch.no_grad()
def test_forward_intermediates_and_pruning_keep_timms_promises(name):
    model = build(name).eval()
    model.set_member(width=0.5)
    x = images()
    final, taps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape[1] for t in taps] == [f["num_chs"] for f in model.feature_info]
    last = len(taps) - 1
    for i in [0, 5, last] if name.startswith("slim_vit") else range(last + 1):
        early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], taps[i])
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([i], prune_norm=True)
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0], taps[i])
        assert pruned.num_classes == 0 and pruned.active_member == Member(0.5)
        if name in CNNS and i < last:  # the features end at the tap
            torch.testing.assert_close(pruned.forward_features(x), taps[i])
            assert pruned.head_hidden_size == taps[i].shape[1]


def _slices_a_parameter(graph: torch.fx.Graph) -> bool:
    return any(n.target is operator.getitem and getattr(n.args[0], "op", "") == "get_attr" for n in graph.nodes)


@pytest.mark.parametrize(
    "name, low_rank",
    [
        ("slim_resnet20", False),
        ("slim_resnet20", True),
        ("slim_mobilenetv2", False),
        ("slim_vit_tiny", False),
        ("slim_vit_tiny", True),
    ],
)
@torch.no_grad()
def test_fx_traces_the_family_at_a_member_and_the_sliced_member_as_a_plain_graph(name, low_rank):
    model = build(name, low_rank=low_rank).eval()
    member = model.set_member(width=0.5, rank=0.25 if low_rank else None)
    x = images()
    expected = model(x)
    elastic = torch.fx.symbolic_trace(model)  # the shapes were decided by set_member
    torch.testing.assert_close(elastic(x), expected)
    assert _slices_a_parameter(elastic.graph)
    sliced = torch.fx.symbolic_trace(zoo.slice(model, member))
    torch.testing.assert_close(sliced(x), expected, rtol=1e-4, atol=1e-5)
    assert not _slices_a_parameter(sliced.graph)  # whole tensors: the graph of a plain network
    if name == "slim_resnet20":  # torchvision's feature extraction, as timm's fx features use it
        stages = create_feature_extractor(model, return_nodes={f"stages.{i}": str(i) for i in range(3)})(x)
        assert [t.shape[1] for t in stages.values()] == [f["num_chs"] for f in model.feature_info[1:]]


@pytest.mark.parametrize("name", ["slim_resnet20", "slim_vit_tiny"])
@torch.no_grad()
def test_torchscript_scripts_the_family_at_a_member_and_the_sliced_member(name):
    model = build(name).eval()
    model.set_member(width=0.5)
    x = images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; timm still tests it
        scripted, sliced = torch.jit.script(model), torch.jit.script(zoo.slice(model, width=0.5))
        traced_then_scripted = torch.jit.script(torch.fx.symbolic_trace(model))  # timm's fx + torchscript test
    torch.testing.assert_close(scripted(x), model(x))
    torch.testing.assert_close(sliced(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traced_then_scripted(x), model(x))


@torch.no_grad()
def test_vit_with_dynamic_img_size_takes_other_sizes_as_timms_vit():
    fixed, dynamic = build("slim_vit_tiny").eval(), build("slim_vit_tiny", dynamic_img_size=True).eval()
    assert fixed.pretrained_cfg["fixed_input_size"] and not dynamic.pretrained_cfg["fixed_input_size"]
    x = images()
    torch.testing.assert_close(dynamic(x), fixed(x))  # at its own size the position embedding is unchanged
    wide = images(size=48)[..., :32]  # 48 x 32: a 6 x 4 grid of 8 px patches
    assert dynamic(wide).shape == (2, 1000)
    taps = dynamic.forward_intermediates(wide, indices=2, intermediates_only=True)
    assert [t.shape for t in taps] == [(2, 192, 6, 4)] * 2
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        fixed(wide)
    with pytest.raises(ValueError, match="multiples of its patch size 8"):
        dynamic(images(size=36))
    backbone = build("slim_vit_tiny", dynamic_img_size=True, features_only=True)
    assert backbone.feature_info.channels() == [192] * 3 and [f.shape for f in backbone(wide)] == [(2, 192, 6, 4)] * 3


@pytest.mark.parametrize("name", ["slim_resnet20", "slim_vit_tiny"])
@torch.no_grad()
def test_headless_models_return_features_and_rebuild_from_their_arguments(name, tmp_path):
    model = build(name, num_classes=0).eval()
    model.set_member(width=0.5)
    x = images()
    pooled = model(x)
    assert pooled.shape == (2, model.head_hidden_size) and model.get_classifier().__class__ is torch.nn.Identity
    torch.testing.assert_close(pooled, model.forward_head(model.forward_features(x), pre_logits=True))
    model.reset_classifier(0, "")  # no pooling either: the features themselves
    torch.testing.assert_close(model(x), model.forward_features(x))
    loaded = zoo.load(zoo.save(model, tmp_path / "headless.safetensors")).eval()
    loaded.set_member(width=0.5)
    torch.testing.assert_close(loaded(x), model(x))

    model.to(device="meta", dtype=torch.float64).eval()  # a new classifier joins the model's device, dtype and mode
    model.reset_classifier(3, "avg")
    head = model.get_classifier()
    assert head.weight.device.type == "meta" and head.weight.dtype == torch.float64
    assert not any(m.training for m in model.modules())


@pytest.mark.slow  # downloads timm's source distribution; CI runs the script: tests/test_timm_conformance_script.py
def test_the_conformance_script_runs_timms_own_tests_end_to_end(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "conformance.md"
    args = ["--configs", "largest,w0.5", "--families", "slim_resnet20", "--out", str(out)]
    proc = subprocess.run(
        ["bash", str(repo / "benchmarks" / "timm_conformance.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
        for line in out.read_text().splitlines()
        if line.startswith("| test_")
    }
    assert rows["test_model_forward_features"] == ["1/0/0", "1/0/0"] and rows["test_model_forward_fx"] == [
        "1/0/0",
        "1/0/0",
    ]
    assert "Failures:" not in out.read_text()
