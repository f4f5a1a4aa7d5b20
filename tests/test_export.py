"""ONNX export: every family through the real exporter and real onnxruntime sessions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.external_data_helper import uses_external_data
from safetensors.torch import save_file
from torch.onnx._internal.exporter._registration import ONNXRegistry
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from export.kv_cache import SCORE_FLOOR, CachedDecoder, floored_scores, masked_attention
from export.latency import member_latency
from export.merge import dense_is_cheaper, merge_low_rank
from export.onnx_export import (
    _UNCACHED_FROM_TORCHLIB,
    ATTENTION_OPSET,
    _torchlib_registry,
    export_file,
    export_member,
    read_record,
)
from export.quantize import evaluate
from zoo import WeightsSource
from zoo.weights import file_sha256

# The smallest variant of every family, at sizes that keep each export to seconds.
FAMILIES = {
    "resnet": ("slim_resnet20", {"img_size": 16}),
    "mobilenetv2": ("slim_mobilenetv2", {"num_classes": 10, "img_size": 32}),
    "vit": ("slim_vit_tiny", {"num_classes": 10, "img_size": 16}),
    "gpt": ("slim_gpt_nano", {"context_length": 16}),
}
GRID = {"widths": [0.5, 1.0]}
LOW_RANK_GRID = {"low_rank": True, "widths": [0.5, 1.0], "ranks": [0.25, 0.5, 1.0]}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Low-rank layers initialise with an SVD, which with several OpenMP threads on a busy
    2-core machine is up to 200x slower than with one; the exports here are single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(model: zoo.ElasticModel) -> zoo.ElasticModel:
    """Fresh models have zero-initialised residual BN weights and unit statistics, which hide
    mistakes; noise on every parameter and statistic makes every path matter."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        for name, buffer in model.named_buffers():
            if "running_var" in name:
                buffer.uniform_(0.5, 2.0, generator=generator)
            elif "running_mean" in name:
                buffer.normal_(0.0, 0.1, generator=generator)
    return model.eval()


def family_file(folder, family: str, metadata: dict | None = None, **extra):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = perturbed(zoo.create_model(name, **kwargs, **extra))
    return zoo.save(model, folder / f"{name}{'_lr' if extra.get('low_rank') else ''}.safetensors", metadata=metadata)


def ort_logits(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]


CASES = [
    ("resnet", {}, 1.0, None),
    ("resnet", LOW_RANK_GRID, 0.5, 0.25),
    ("mobilenetv2", {}, 1.0, None),
    ("mobilenetv2", LOW_RANK_GRID, 0.5, 0.5),
    ("vit", {}, 1.0, None),
    ("vit", LOW_RANK_GRID, 0.5, 0.25),
    ("gpt", {}, 1.0, None),
    ("gpt", LOW_RANK_GRID, 0.5, 0.25),
]
# 13-40 s each (the clean-clone suite passed 600 s): CI keeps a low-rank member of the ResNet, ViT
# and GPT (the same export path, and merging); MobileNetV2's members export in test_small_exports
SLOW_CASES = {("resnet", 1.0), ("mobilenetv2", 1.0), ("mobilenetv2", 0.5), ("vit", 1.0), ("gpt", 1.0)}


@pytest.mark.parametrize(
    "family, build, width, rank",
    [pytest.param(*c, marks=pytest.mark.slow) if (c[0], c[2]) in SLOW_CASES else c for c in CASES],
    ids=[f"{c[0]}-w{c[2]}-r{c[3]}" for c in CASES],
)
def test_every_family_exports_verified_with_dynamic_axes_and_metadata(tmp_path, family, build, width, rank):
    grid = build or GRID
    weights = family_file(
        tmp_path,
        family,
        metadata={"metrics": [{"subnet": {"width": width, **({"rank": rank} if rank else {})}, "loss": 1.5}]},
        **grid,
    )
    source = WeightsSource.open(weights)
    result = export_member(source.member(width, rank), tmp_path / "out" / "member.onnx")
    member = source.member(width, rank).model
    merge_low_rank(member)  # what the exported graph computes

    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["member.onnx"]  # no .data file, no temp file
    proto = onnx.load(str(result.path))
    assert not any(uses_external_data(t) for t in proto.graph.initializer)
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    if family != "gpt":
        assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]

    # dynamic axes, run for real: batch 1 and 5, and two sequence lengths for the language model
    shapes = [(1, 5), (5, 16)] if family == "gpt" else [(1, None), (5, None)]
    with torch.no_grad():
        for batch, seq_len in shapes:
            x = member.example_input(batch, seq_len=seq_len)
            np.testing.assert_allclose(ort_logits(result.path, x), member(x).numpy(), atol=1e-4, rtol=0)

    record = read_record(result.path)
    assert record == result.metadata == json.loads({p.key: p.value for p in proto.metadata_props}["zoo"])
    assert record["arch"] == FAMILIES[family][0] and record["family"] == zoo.family_of(record["arch"])
    assert record["subnet"] == ({"width": width, "rank": rank} if rank else {"width": width})
    assert record["num_params"] == sum(p.numel() for p in member.parameters())
    assert record["flops"] == result.flops == zoo.count_flops(member)
    assert record["source_sha256"] == file_sha256(weights)
    assert record["opset"] == next(o.version for o in proto.opset_import if o.domain == "")
    assert record["quantized"] is None and record["metrics"] == {"loss": 1.5}
    assert record["fusions"] is None and "fusions" not in result.summary()
    ops = [node.op_type for node in proto.graph.node]
    if family in ("vit", "gpt"):  # attention as onnxruntime's one-kernel ONNX op, the opset that has it
        assert record["opset"] == ATTENTION_OPSET and ops.count("Attention") == len(list(member.blocks.children()))
        assert "Softmax" not in ops
        # q, k and v as [batch, tokens, width]: no transposes but the ViT's patch embedding's
        assert ops.count("Transpose") == (family == "vit")
    if family == "gpt":  # causal over the cache in the op: no floored scores
        assert {"Clip", "ReduceMax"}.isdisjoint(ops)
    if family == "gpt":
        assert record["input"] == {"kind": "tokens", "context_length": 16, "vocab_size": 256}
        assert record["kv_cache"] == len(list(member.blocks.children())) and "key/value cache" in result.summary()
        assert_cache_continues_the_sequence(result.path, member)
    else:
        assert record["input"]["kind"] == "image" and record["input"]["shape"] == list(
            member.pretrained_cfg["input_size"]
        )
        assert record["kv_cache"] is None


def assert_cache_continues_the_sequence(path, member):
    """Logits of a sequence fed in three pieces, each reading the cache of the ones before,
    equal PyTorch's logits of the whole sequence; the cache inputs default to empty."""
    blocks = list(member.blocks.children())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = [i.name for i in sess.get_overridable_initializers()]
    assert [i.name for i in sess.get_inputs()] == ["input"] and len(past) == 2 * len(blocks)
    assert past[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    present = [name.replace("past_key_values", "present") for name in past]
    tokens = member.example_input(1, seq_len=16)
    with torch.no_grad():
        expected = member(tokens).numpy()
    pieces, cache = [], {}
    for start, stop in [(0, 7), (7, 8), (8, 16)]:
        logits, *values = sess.run(["logits", *present], {"input": tokens[:, start:stop].numpy(), **cache})
        assert [v.shape[:3] for v in values] == [(1, block.attn.num_heads, stop) for block in blocks for _ in "kv"]
        pieces.append(logits)
        cache = dict(zip(past, values))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), expected, atol=1e-4, rtol=0)


# the fused export of a smaller ViT runs in CI: tests/test_small_exports.py
@pytest.mark.parametrize("family", ["gpt", pytest.param("vit", marks=pytest.mark.slow)])
def test_fused_transformer_is_verified_and_says_which_kernels_it_uses(tmp_path, family):
    weights = family_file(tmp_path, family, **GRID)
    out = tmp_path / "fused.onnx"
    result = CliRunner().invoke(app, ["export", str(weights), "--width", "0.5", "--fuse", "--out", str(out)])
    assert result.exit_code == 0, result.output
    member = WeightsSource.open(weights).member(0.5).model.eval()
    depth = len(list(member.blocks.children()))
    record = read_record(out)
    # attention is already one ONNX Attention node in both
    assert record["fusions"] == {"BiasGelu": depth, "SkipLayerNormalization": 2 * depth}
    kernels = ", ".join(f"{count} {kernel}" for kernel, count in record["fusions"].items())
    assert f"onnxruntime fusions: {kernels}" in result.output
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("LayerNormalization") == 1  # only the final norm; the others became SkipLayerNormalization
    assert ops.count("Attention") == depth
    diff = float(result.output.split("max |onnxruntime - PyTorch| = ")[1].split()[0])
    assert diff <= 1e-4
    with torch.no_grad():
        for batch in (1, 3):
            x = member.example_input(batch)
            np.testing.assert_allclose(ort_logits(out, x), member(x).numpy(), atol=1e-4, rtol=0)
    if family == "gpt":
        assert_cache_continues_the_sequence(out, member)


def test_masked_attention_equals_sdpa_and_keeps_every_exp_normal():
    """The cached decoder's attention: the same output as PyTorch's masked SDPA, also for
    scores hundreds apart, and no softmax input below the floor (whose exp is a normal float)."""
    generator = torch.Generator().manual_seed(0)
    past, sequence = 5, 7
    positions = torch.arange(past + sequence)
    visible = positions[None, :] <= positions[past:, None]
    hidden = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    for spread in (1.0, 30.0):  # ordinary scores, and scores far into exp's subnormal range
        q, k, v = (
            torch.randn(2, 3, n, 16, generator=generator) * spread for n in (sequence, past + sequence, past + sequence)
        )
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        np.testing.assert_allclose(
            masked_attention(q, k, v, hidden).numpy(), expected.numpy(), atol=1e-5 * spread, rtol=1e-5
        )
    scores = floored_scores(q, k, hidden)  # the softmax input
    assert float(scores.min()) == SCORE_FLOOR and float(scores.amax(-1).min()) == 0.0  # masked keys sit on the floor


def test_the_decoder_without_a_cache_is_the_model_and_search_times_it():
    """``zoo search`` times a language model through the cached decoder with no cache: the same
    logits as the model, exported by the TorchScript exporter into a working onnxruntime file."""
    name, kwargs = FAMILIES["gpt"]
    torch.manual_seed(0)
    family = perturbed(zoo.create_model(name, **kwargs, **GRID))
    small = zoo.slice(family, {"width": 0.5}).eval()
    tokens = small.example_input(3)
    with torch.no_grad():
        np.testing.assert_allclose(CachedDecoder(small)(tokens).numpy(), small(tokens).numpy(), atol=1e-5, rtol=0)
    assert member_latency(family, zoo.Member(width=0.5), repeats=3) > 0


def test_merge_rule_merges_only_where_dense_is_cheaper(tmp_path):
    assert dense_is_cheaper(4, 8, 8) and not dense_is_cheaper(3, 8, 8)  # r >= m n / (m + n)
    weights = family_file(tmp_path, "resnet", **LOW_RANK_GRID)
    source = WeightsSource.open(weights)
    x = torch.randn(2, 3, 16, 16)

    full_rank = source.member(0.5, 1.0).model
    with torch.no_grad():
        before = full_rank(x)
        assert merge_low_rank(full_rank) == {"conv": [20, 20]}
        torch.testing.assert_close(full_rank(x), before, atol=1e-5, rtol=1e-5)
    low_rank = source.member(0.5, 0.25).model
    assert merge_low_rank(low_rank) == {"conv": [0, 20]}

    merged = export_file(weights, tmp_path / "r1.onnx", 0.5, 1.0)
    kept = export_file(weights, tmp_path / "r025.onnx", 0.5, 0.25)
    assert merged.max_abs_diff <= 1e-4 and kept.max_abs_diff <= 1e-4
    convs = {r.path.name: sum(n.op_type == "Conv" for n in onnx.load(str(r.path)).graph.node) for r in (merged, kept)}
    assert convs == {"r1.onnx": 1 + 20, "r025.onnx": 1 + 2 * 20}  # stem + one or two convs per factorized layer
    assert merged.metadata["low_rank_layers"] == {"merged": 20, "factorized": 0}
    assert kept.metadata["low_rank_layers"] == {"merged": 0, "factorized": 20}
    assert "merged 20 of 20 low-rank layers (conv 20 of 20)" in merged.summary()
    assert _torchlib_registry.cache_info().hits >= 1  # the second export reused the first's ONNX table
    assert ONNXRegistry.from_torchlib.__func__ is _UNCACHED_FROM_TORCHLIB.__func__  # torch's own again


def test_export_all_writes_every_member_and_a_manifest(tmp_path):
    metrics = [
        {"subnet": {"width": 0.5}, "accuracy": 0.5, "loss": 1.0},
        {"subnet": {"width": 1.0}, "accuracy": 0.75, "loss": 0.5},
    ]
    weights = family_file(tmp_path, "resnet", metadata={"metrics": metrics}, **GRID)
    result = CliRunner().invoke(app, ["export", str(weights), "--all", "--out", str(tmp_path / "family")])
    assert result.exit_code == 0, result.output

    manifest = json.loads((tmp_path / "family" / "manifest.json").read_text())
    source = WeightsSource.open(weights)
    assert [m["member"] for m in manifest["members"]] == [{"width": 0.5}, {"width": 1.0}]
    for entry, expected in zip(manifest["members"], metrics):
        member = source.member(zoo.Member.from_dict(entry["member"])).model
        assert (tmp_path / "family" / entry["file"]).is_file()
        assert entry["parameters"] == sum(p.numel() for p in member.parameters())
        assert entry["flops"] == zoo.count_flops(member)
        assert entry["metric"] == {"accuracy": expected["accuracy"], "loss": expected["loss"]}
        assert read_record(tmp_path / "family" / entry["file"])["subnet"] == entry["member"]
    assert manifest["source_sha256"] == file_sha256(weights)
    assert sorted(p.name for p in (tmp_path / "family").iterdir()) == sorted(
        ["manifest.json"] + [m["file"] for m in manifest["members"]]
    )


def test_int8_cnn_is_static_qdq_smaller_and_reports_its_accuracy_cost(tmp_path):
    name = "slim_resnet20"
    torch.manual_seed(0)
    recorded = {
        "data": "digits",
        "labels": [f"digit {d}" for d in range(10)],
        "mean": [0.5],
        "std": [0.25],
    }  # as the trainer records
    weights = zoo.save(
        perturbed(zoo.create_model(name, in_chans=1, img_size=8, **GRID)),
        tmp_path / "digits.safetensors",
        metadata={"train": recorded},
    )
    runner = CliRunner()
    fp32 = runner.invoke(
        app,
        [
            "export",
            str(weights),
            "--width",
            "0.5",
            "--opset",
            "18",
            "--no-verify",
            "--out",
            str(tmp_path / "fp32.onnx"),
        ],
    )
    int8 = runner.invoke(
        app, ["export", str(weights), "--width", "0.5", "--quantize", "int8", "--out", str(tmp_path / "int8.onnx")]
    )
    assert fp32.exit_code == 0 and int8.exit_code == 0, int8.output
    assert (tmp_path / "int8.onnx").stat().st_size < 0.6 * (tmp_path / "fp32.onnx").stat().st_size
    assert "verification: skipped" in fp32.output and read_record(tmp_path / "fp32.onnx")["opset"] == 18

    record = read_record(tmp_path / "int8.onnx")
    report = record["quantization"]
    assert record["quantized"] == "int8" and report["method"].startswith("static QDQ")
    assert record["labels"] == recorded["labels"] and record["input"] == {
        "kind": "image",
        "shape": [1, 8, 8],
        "mean": [0.5],
        "std": [0.25],
    }
    assert report["calibration_samples"] == 256 and report["validation_samples"] > 100
    assert report["change"]["accuracy"] == pytest.approx(report["int8"]["accuracy"] - report["fp32"]["accuracy"])
    assert f"({report['change']['accuracy']:+.4f})" in int8.output
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    # one size for the int8 file, the one on disk; its metrics are its own, measured
    size = f"{(tmp_path / 'int8.onnx').stat().st_size / 1e6:.2f} MB"
    assert f"wrote {tmp_path / 'int8.onnx'} ({size}" in int8.output and f"as float32 -> {size};" in int8.output
    assert record["metrics"] == report["int8"] != report["fp32"]
    info = dict(
        line.split(None, 1) for line in runner.invoke(app, ["info", str(tmp_path / "int8.onnx")]).output.splitlines()
    )
    assert info["metrics"].startswith(
        f"accuracy {report['int8']['accuracy']:.4f} loss {report['int8']['loss']:.4f} (this int8 file"
    )
    assert info["float32"].startswith(f"accuracy {report['fp32']['accuracy']:.4f} loss {report['fp32']['loss']:.4f}")
    for batch in (1, 5):  # the batch axis stays dynamic after quantization
        assert ort_logits(tmp_path / "int8.onnx", torch.randn(batch, 1, 8, 8)).shape == (batch, 10)


def test_int8_language_model_is_dynamic_and_reports_bits_per_byte(tmp_path):
    weights = family_file(tmp_path, "gpt")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(4, 8, 17))
    validation = [(t[:, :-1].astype(np.int64), t[:, 1:].astype(np.int64)) for t in tokens]
    result = export_file(weights, tmp_path / "gpt8.onnx", quantize="int8", validation=validation)
    report = result.quantization
    assert report["method"].startswith("dynamic") and report["validation_samples"] == 4 * 8 * 16
    assert result.size_bytes < 0.5 * report["fp32_bytes"] and result.size_bytes == result.path.stat().st_size
    assert result.metadata["metrics"] == report["int8"]
    fp32_bits = report["fp32"]["bits_per_byte"]
    assert 7.0 < fp32_bits < 9.5  # an untrained byte model predicts about 8 bits per byte
    assert report["change"]["bits_per_byte"] == pytest.approx(report["int8"]["bits_per_byte"] - fp32_bits)
    assert evaluate(result.path, validation, "tokens") == pytest.approx(report["int8"])
    assert read_record(result.path) == result.metadata and result.metadata["quantized"] == "int8"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(result.path)).graph.node}


def test_export_recalibrates_an_untrained_member_when_given_data(tmp_path):
    torch.manual_seed(0)
    weights = zoo.save(
        perturbed(zoo.create_model("slim_resnet20", in_chans=1, img_size=8, **GRID)), tmp_path / "digits.safetensors"
    )
    result = CliRunner().invoke(
        app, ["export", str(weights), "--width", "0.75", "--calibrate", "digits", "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 0, result.output
    assert "batch-norm statistics recalibrated on digits" in result.output
    assert read_record(tmp_path / "m.onnx")["subnet"] == {"width": 0.75}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("slim_resnet56", {}),
        ("slim_resnet18", {"num_classes": 10, "img_size": 64}),
        ("slim_resnet50", {"num_classes": 10, "img_size": 64}),
        ("slim_vit_small", {"num_classes": 10, "img_size": 32}),
        ("slim_gpt_small", {"context_length": 64}),
    ],
)
def test_larger_variants_export_verified(tmp_path, name, kwargs):
    torch.manual_seed(0)
    weights = zoo.save(perturbed(zoo.create_model(name, **kwargs, **LOW_RANK_GRID)), tmp_path / "w.safetensors")
    for width, rank in [(1.0, 1.0), (0.5, 0.25)]:
        result = export_file(weights, tmp_path / f"{width}_{rank}.onnx", width, rank)
        assert result.max_abs_diff <= 1e-4


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_without_the_provider_is_a_one_line_error(tmp_path):
    weights = family_file(tmp_path, "resnet", **GRID)
    result = CliRunner().invoke(app, ["export", str(weights), "--device", "cuda", "--out", str(tmp_path / "c.onnx")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "CUDAExecutionProvider" in result.stderr
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize("case", ["random bytes", "foreign safetensors", "missing", "untrained member", "bad opset"])
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, case):
    path = tmp_path / "in.safetensors"
    args = []
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "foreign safetensors":
        save_file({"weight": torch.zeros(3, 3)}, str(path))
    elif case == "untrained member":
        family_file(tmp_path, "resnet", **GRID).rename(path)
        args = ["--width", "0.75"]
    elif case == "bad opset":
        family_file(tmp_path, "resnet", **GRID).rename(path)
        args = ["--opset", "11"]
    out = tmp_path / "out" / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(path), *args, "--out", str(out)])
    assert result.exit_code == (2 if case == "bad opset" else 1)
    if case != "bad opset":
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()
    assert "Traceback" not in result.output


def test_a_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    import export.verify

    weights = family_file(tmp_path, "gpt")
    monkeypatch.setattr(export.verify, "max_abs_difference", lambda *args: export.verify.Gap(0.5, 3.0))  # wrong
    member = WeightsSource.open(weights).member()
    with pytest.raises(ValueError, match="verification failed.*0.5"):
        export_member(member, tmp_path / "out" / "m.onnx")
    assert not (tmp_path / "out").exists()


def test_a_graph_the_optimizer_broke_is_exported_again_without_it(tmp_path, monkeypatch):
    """onnxscript's optimizer left Gemma 4's ViT with a value no node makes (found by
    benchmarks/timm_coverage.py): where the checker refuses the optimized graph, the member is
    exported again without the optimizer, then verified as any export."""
    from onnx import TensorProto, helper

    import export.onnx_export as onnx_export

    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy")
    dangling = helper.make_graph([helper.make_node("Relu", ["made_by_no_node"], ["y"])], "g", [x], [y])
    sound = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    assert not onnx_export._passes_checker(helper.make_model(dangling))
    assert onnx_export._passes_checker(helper.make_model(sound, opset_imports=[helper.make_opsetid("", 18)]))

    optimized, real_export = [], torch.onnx.export

    def spying_export(*args, **kwargs):
        optimized.append(kwargs["optimize"])
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spying_export)
    monkeypatch.setattr(onnx_export, "_passes_checker", lambda proto: not optimized[-1])  # refuse the optimized one
    weights = family_file(tmp_path, "resnet", **GRID)
    result = export_member(WeightsSource.open(weights).member(0.5), tmp_path / "m.onnx")
    assert optimized == [True, False] and result.max_abs_diff <= 1e-4 and result.path.is_file()


def test_an_exporter_failure_is_reported_by_its_root_cause():
    """torch.onnx's first line only names the step that failed; the exception summary it
    appends holds the cause, root first."""
    from export.onnx_export import _export_reason

    message = (
        "Failed to decompose the FX graph for ONNX compatibility. \x1b[96mThis is step 2/3\x1b[0m of exporting.\n"
        "## Exception summary\n\n<class 'torch._dynamo.exc.Unsupported'>: data-dependent branch\n⬆️\n"
        "<class 'RuntimeError'>: wrapper\n\n(Refer to the full stack trace above for more information.)"
    )
    reason = _export_reason(RuntimeError(message))
    assert reason == "Failed to decompose the FX graph for ONNX compatibility: Unsupported: data-dependent branch"
    assert _export_reason(ValueError("one line\nmore")) == "one line"


def test_the_verification_tolerance_scales_with_the_outputs():
    """float32 rounds large logits coarser: 1e-4 per unit of the outputs' scale, absolute below 1."""
    from export.verify import Gap

    assert Gap(0.0016, 160.0).within() and not Gap(0.0016, 10.0).within()
    assert not Gap(2e-4, 0.5).within() and Gap(9e-5, 0.5).within()
    assert "(> 0.001, 0.0001 of the outputs' scale 10)" in Gap(0.5, 10.0).failure("onnxruntime")
