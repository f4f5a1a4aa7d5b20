"""CI-sized exports of what the slow tests export at full size: structured members (per-block
heads, MLP widths, ranks, skipped blocks) of small GPT, ViT and MobileNetV2 networks, built from
the families' own classes with fewer and narrower blocks, each verified against PyTorch in a
real onnxruntime session; and the fused ViT export. The full-size versions stay ``slow``
(tests/test_members.py, tests/test_export.py)."""

from __future__ import annotations

import onnx
import pytest
import torch
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app
from export.onnx_export import export_member, read_record
from zoo import catalogue, registry
from zoo.models._builder import build
from zoo.models.gpt import SlimGPT
from zoo.models.mobilenetv2 import SlimMobileNetV2
from zoo.models.vit import SlimVisionTransformer
from zoo.registry import Variant

# name -> (family, class, the variant's fixed arguments): small networks of the families' classes
SMALL = {
    "small_gpt": ("gpt", SlimGPT, dict(embed_dim=32, depth=3, num_heads=2, context_length=8, low_rank=True)),
    "small_vit": ("vit", SlimVisionTransformer,
                  dict(embed_dim=48, depth=3, num_heads=3, num_classes=10, img_size=16, patch_size=8)),
    "small_mobilenetv2": ("mobilenetv2", SlimMobileNetV2,
                          dict(num_classes=10, img_size=16, stem_channels=8, head_features=64,
                               settings=((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2)))),
}  # fmt: skip


CATALOGUED = {"gpt": "slim_gpt_nano", "vit": "slim_vit_tiny", "mobilenetv2": "slim_mobilenetv2"}


@pytest.fixture(autouse=True)
def small_variants(monkeypatch):
    """The small networks as variants in zoo's catalogue for the test (slicing and loading
    rebuild a model by its name), not in timm's; removed afterwards."""
    for name, (family, cls, fixed) in SMALL.items():

        def entrypoint(pretrained=False, name=name, **kwargs):
            return build(name, pretrained, kwargs)

        monkeypatch.setitem(registry._VARIANTS, name, Variant(name, family, cls, fixed, {}, entrypoint))
        # the CLI checks a file's architecture against the catalogue's facts before importing torch
        monkeypatch.setitem(catalogue.MODELS, name, catalogue.MODELS[CATALOGUED[family]])


def _small(name: str) -> zoo.ElasticModel:
    """A small network, every parameter off its initialisation (so all of them matter)."""
    torch.manual_seed(0)
    model = zoo.create_model(name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", list(SMALL))
@torch.no_grad()
def test_a_structured_member_of_a_small_network_exports_verified(name, tmp_path):
    model = _small(name)
    member = model.resolve_member(model.sample_member(torch.Generator().manual_seed(2)))
    if name == "small_gpt":  # the slow test's kind of member: per-block heads and ranks, a skipped block
        member = model.resolve_member({"heads": [1, 0.5, 1], "mlp": 0.25, "rank": [1, 0.5, 0.25], "blocks": [0, 2]})
    if model.needs_calibration(member):  # statistics from enough data that no channel's variance is tiny
        zoo.recalibrate_bn(model, [model.example_input(16) for _ in range(4)], member)
    source = zoo.WeightsSource(tmp_path / "none", model, "0" * 64)
    result = export_member(source.member(member), tmp_path / "m.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.metadata["subnet"] == member.to_dict() and result.num_params <= zoo.count_params(model, member)
    assert not member.is_uniform  # a member no uniform grid holds


def test_the_fused_export_of_a_small_vit_is_verified_and_says_its_kernels(tmp_path):
    weights = zoo.save(_small("small_vit"), tmp_path / "vit.safetensors")
    out = tmp_path / "fused.onnx"
    result = CliRunner().invoke(app, ["export", str(weights), "--width", "0.5", "--fuse", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = read_record(out)
    assert record["fusions"] == {"BiasGelu": 3, "SkipLayerNormalization": 6}
    assert "onnxruntime fusions: 3 BiasGelu, 6 SkipLayerNormalization" in result.output
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("Attention") == 3 and ops.count("LayerNormalization") == 1
    assert float(result.output.split("max |onnxruntime - PyTorch| = ")[1].split()[0]) <= 1e-4
