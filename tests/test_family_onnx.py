"""`zoo export --family`: every member in one ONNX file, weights stored once, the member chosen at
run time. Small networks of the families' own classes (a ResNet of one block per stage, a ViT of
two blocks, whose fused QKV rows are shared per chunk), exported once per module and compared in
real onnxruntime sessions with each member's own export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app
from export import family_graph
from export.onnx_export import export_member
from export.onnx_prune import member_model
from export.runtime import Predictor
from zoo import catalogue, registry
from zoo.models._builder import build
from zoo.models.resnet import SlimResNet
from zoo.models.vit import SlimVisionTransformer
from zoo.registry import Variant

SMALL = {
    "tiny_resnet": ("resnet", SlimResNet, dict(block="basic", layers=(1, 1, 1), channels=(8, 16, 32), stem="cifar",
                                               num_classes=10, img_size=8, in_chans=1), "slim_resnet20"),
    "tiny_vit": ("vit", SlimVisionTransformer, dict(embed_dim=48, depth=2, num_heads=3, num_classes=10, img_size=8,
                                                    patch_size=4), "slim_vit_tiny"),
}  # fmt: skip
METRICS = [{"subnet": {"width": 0.5}, "accuracy": 0.625, "loss": 1.5}, {"subnet": {"width": 1.0}, "accuracy": 0.75}]


@pytest.fixture(scope="module")
def small_variants():
    """The small networks as zoo variants for the module (slicing rebuilds a model by name; the CLI
    checks a file's architecture against the catalogue before importing torch)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, (family, cls, fixed, catalogued) in SMALL.items():

            def entrypoint(pretrained=False, name=name, **kwargs):
                return build(name, pretrained, kwargs)

            patch.setitem(registry._VARIANTS, name, Variant(name, family, cls, fixed, {}, entrypoint))
            patch.setitem(catalogue.MODELS, name, catalogue.MODELS[catalogued])
        yield


def _weights(folder, name: str):
    torch.manual_seed(0)
    model = zoo.create_model(name, widths=[0.5, 1.0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        for buffer_name, buffer in model.named_buffers():
            if "running_var" in buffer_name:
                buffer.uniform_(0.5, 2.0, generator=generator)
    channels = model.in_chans
    metadata = {"metrics": METRICS, "train": {"data": "digits", "mean": [0.5] * channels, "std": [0.25] * channels}}
    return zoo.save(model.eval(), folder / f"{name}.safetensors", metadata=metadata)


class Exports(dict):
    """Per network, exported on first use: its weights, its family file (written by `zoo export
    --family`), each member's own export by key, and the command's output."""

    def __init__(self, folders):
        super().__init__()
        self.folders = folders

    def __missing__(self, name: str):
        folder = self.folders.mktemp(name)
        weights = _weights(folder, name)
        result = CliRunner().invoke(app, ["export", str(weights), "--family", "--out", str(folder / "family.onnx")])
        assert result.exit_code == 0, result.output
        source = zoo.WeightsSource.open(weights)
        own = {m.key: export_member(source.member(m), folder / f"{m.key}.onnx").path for m in source.model.members}
        self[name] = (weights, folder / "family.onnx", own, result.output)
        return self[name]


@pytest.fixture(scope="module")
def exported(small_variants, tmp_path_factory):
    return Exports(tmp_path_factory)


def _images(name: str) -> np.ndarray:
    channels = 1 if name == "tiny_resnet" else 3
    return np.random.default_rng(0).standard_normal((3, channels, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("name", ["tiny_resnet", pytest.param("tiny_vit", marks=pytest.mark.slow)])
def test_every_member_of_the_family_file_equals_its_own_export(exported, name):
    _, family, own, output = exported[name]
    x = _images(name)
    plain = ort.InferenceSession(str(family), providers=["CPUExecutionProvider"])
    record = Predictor(family).metadata
    assert [e["key"] for e in record["members"]] == ["w0p5", "w1"] and "max |onnxruntime - PyTorch|" in output
    for entry in record["members"]:
        expected = ort.InferenceSession(str(own[entry["key"]]), providers=["CPUExecutionProvider"]).run(
            ["logits"], {"input": x}
        )[0]
        chosen = plain.run(["logits"], {"input": x, "member": np.array(entry["index"])})[0]
        assert np.abs(chosen - expected).max() <= 1e-5
        assert np.abs(Predictor(family, member=entry["key"]).run(x) - expected).max() <= 1e-5
    default = plain.run(["logits"], {"input": x})[0]  # without `member`: the largest
    assert np.array_equal(default, plain.run(["logits"], {"input": x, "member": np.array(1)})[0])
    assert family.stat().st_size <= 1.1 * own["w1"].stat().st_size  # weights stored once
    assert family.stat().st_size < own["w1"].stat().st_size + own["w0p5"].stat().st_size * 0.5


def test_a_session_of_one_member_holds_only_that_members_graph(exported):
    family = exported["tiny_resnet"][1]
    model = onnx.load_from_string(member_model(family.read_bytes(), "member:w0p5")[0])
    assert {n.op_type for n in model.graph.node}.isdisjoint({"If"})
    assert all(n.name.startswith("w0p5/") for n in model.graph.node)
    assert not any(t.name.startswith("w1/") for t in model.graph.initializer)
    whole = onnx.load(str(family)).graph.initializer
    assert {t.name for t in model.graph.initializer} < {t.name for t in whole}  # the outer tensors it reads
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) < sum(int(np.prod(t.dims)) for t in whole)


def test_predictor_chooses_a_member_by_key_json_or_width_and_refuses_others(exported):
    _, family, _, _ = exported["tiny_resnet"]
    x = _images("tiny_resnet")
    by_key = Predictor(family, member="w0p5").run(x)
    assert np.array_equal(Predictor(family, member={"width": 0.5}).run(x), by_key)
    assert np.array_equal(Predictor(family, member=0.5).run(x), by_key)
    assert Predictor(family).member["key"] == "w1"
    with pytest.raises(ValueError, match=r"holds no member \"w0p3\"; its members: w0p5 .*, w1"):
        Predictor(family, member="w0p3")


def test_zoo_run_and_info_on_a_family_file(exported, tmp_path):
    _, family, _, _ = exported["tiny_resnet"]
    np.save(tmp_path / "image.npy", np.random.default_rng(0).random((8, 8, 1)).astype(np.float32))
    runner = CliRunner()
    small = runner.invoke(app, ["run", str(family), str(tmp_path / "image.npy"), "--member", "w0p5", "--top-k", "3"])
    assert small.exit_code == 0, small.output
    top = Predictor(family, member="w0p5").top_k([np.load(tmp_path / "image.npy")], k=3)[0]
    assert small.output.strip().endswith(", ".join(f"{label} {p:.4f}" for label, p in top))
    unknown = runner.invoke(app, ["run", str(family), str(tmp_path / "image.npy"), "--member", '{"width": 0.3}'])
    assert unknown.exit_code == 1 and unknown.output.count("\n") == 1 and "holds no member" in unknown.output

    info = runner.invoke(app, ["info", str(family)])
    assert info.exit_code == 0, info.output
    assert "2 in one file" in info.output
    assert "w0p5: width=0.5, " in info.output and "accuracy 0.6250" in info.output
    record = json.loads(runner.invoke(app, ["info", str(family), "--json"]).output)["zoo"]
    source = zoo.WeightsSource.open(exported["tiny_resnet"][0])
    for entry in record["members"]:
        member = source.member(zoo.Member.from_dict(entry["subnet"])).model
        assert entry["num_params"] == sum(p.numel() for p in member.parameters())
        assert entry["flops"] == zoo.count_flops(member) and entry["flops"] > 0
        assert f"{entry['num_params']:,} parameters" in info.output


def test_int8_family_file_runs_every_member_and_records_their_cost(exported, tmp_path):
    weights = exported["tiny_resnet"][0]
    out = tmp_path / "family.int8.onnx"
    result = CliRunner().invoke(app, ["export", str(weights), "--family", "--quantize", "int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = Predictor(out).metadata
    assert record["quantized"] == "int8" and set(record["quantization"]["members"]) == {"w0p5", "w1"}
    fp32 = exported["tiny_resnet"][1]
    x = _images("tiny_resnet")
    for entry in record["members"]:
        assert set(entry["metrics"]) == {"accuracy", "loss"}
        int8 = Predictor(out, member=entry["key"]).run(x)
        assert int8.shape == (3, 10) and np.isfinite(int8).all()
        assert np.abs(int8 - Predictor(fp32, member=entry["key"]).run(x)).max() < 0.5  # quantized, not another model


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "0.5"], "--family exports every trained member"),
        (["--fuse"], "--family does not take --fuse"),
    ],
)
def test_family_export_refuses_what_it_cannot_do_in_one_line(exported, tmp_path, args, message):
    weights = exported["tiny_resnet"][0]
    result = CliRunner().invoke(app, ["export", str(weights), "--family", *args, "--out", str(tmp_path / "f.onnx")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "f.onnx").exists()


def test_a_language_model_family_is_refused_in_one_line(tmp_path):
    weights = zoo.save(zoo.create_model("slim_gpt_nano", context_length=8), tmp_path / "gpt.safetensors")
    result = CliRunner().invoke(app, ["export", str(weights), "--family", "--out", str(tmp_path / "f.onnx")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "key/value cache" in result.output and not (tmp_path / "f.onnx").exists()


def test_a_member_tensor_is_found_as_a_prefix_of_the_full_one_per_fused_chunk():
    full = np.arange(6 * 8, dtype=np.float32).reshape(6, 8) + 1  # QKV rows: three blocks of two
    q, k, v = full[0:1, :6], full[2:3, :6], full[4:5, :6]
    other = full.copy()
    other[1:] += 100  # the same first element, other rows
    shared = family_graph._SharedTensors(
        [numpy_helper.from_array(other, "other"), numpy_helper.from_array(full, "qkv")]
    )
    assert shared.find("any", np.concatenate([q, k, v]), (1, 3)) == family_graph._Slice("qkv", 0, 3)
    assert shared.find("any", full[:4, :5].copy(), (1, 3)) == family_graph._Slice("qkv", None, 1)
    assert shared.find("any", np.concatenate([q, v, k]), (1, 3)) is None  # another order is no prefix
    assert shared.find("any", full[:3, :6].copy(), (1,)) == family_graph._Slice("qkv", None, 1)
    assert shared.find("any", full[:1, :3].copy(), (1,)) is None  # too small to share: kept by the member
