"""`zoo --help`, `zoo list` and `zoo info` read data and file headers only: checked in fresh
processes that they import neither torch nor timm (importing timm takes seconds), and that
what they print agrees with the loaded models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from zoo.catalogue import PRETRAINED

REPO = Path(__file__).resolve().parents[1]

# Runs one command in-process and reports which heavy modules it imported.
PROBE = """
import json, sys
from cli.app import main
sys.argv = ["zoo", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code or 0
heavy = sorted(m for m in ("torch", "timm", "torchvision", "onnx", "zoo") if m in sys.modules)
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def probe(*args: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"}, timeout=120,
    )  # fmt: skip
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, proc.stdout + proc.stderr
    return json.loads(line[-1][6:]), proc.stdout + proc.stderr


def _zoo_onnx(path: Path) -> Path:
    """A real ONNX file carrying a zoo record (built with onnx's helper: no export needed)."""
    node = helper.make_node("Identity", ["input"], ["logits"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="zoo", producer_version="0.1.0"
    )
    record = {
        "arch": "slim_resnet20",
        "family": "resnet",
        "subnet": {"width": 0.5},
        "num_params": 5,
        "metrics": {"accuracy": 0.5, "loss": 1.0},
    }
    helper.set_model_props(model, {"zoo": json.dumps(record)})
    onnx.save(model, str(path))
    return path


def test_metadata_commands_import_no_torch(tmp_path):
    onnx_path = _zoo_onnx(tmp_path / "m.onnx")
    for args, expect in [
        (["--help"], "Usage"),
        (["list"], "slim_resnet20.digits"),
        (["info", zoo.weights.pretrained_path("slim_gpt_nano")], "bits_per_byte"),
        (["info", "slim_resnet20", "--pretrained"], "accuracy"),
        (["info", "slim_resnet20", "--pretrained", "--json"], '"labels"'),
        (["info", onnx_path], "input float32 [batch, 10]"),
        (["info", onnx_path, "--json"], '"inputs": [\n    "input float32 [batch, 10]"'),
    ]:
        result, output = probe(*args)
        assert result == {"code": 0, "heavy": []}, (args, output)
        assert expect in output, (args, output)


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_info_agrees_with_the_loaded_model(name):
    path = zoo.weights.pretrained_path(name)
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines() if line.split(None, 1)[0] != "metrics")
    model = zoo.load(path)
    assert lines["members"].split(" (")[0] == model.describe_members()
    assert lines["axes"] == ", ".join(model.axes)
    assert model.describe_space() == f"{name}: {lines['space']}; trained members: {model.describe_members()}"
    assert lines["parameters"] == f"{sum(p.numel() for p in model.parameters()):,}"
    assert lines["architecture"] == f"{name} (family {zoo.family_of(name)}, {model.input_kind} input)"
    assert ("LayerNorm" in lines["members"]) == (not model.uses_batchnorm)


def test_info_reports_a_truncated_weights_file_without_reading_tensors(tmp_path):
    data = zoo.weights.pretrained_path("slim_resnet20").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    result = CliRunner().invoke(app, ["info", str(cut)])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "truncated" in result.stderr
    with pytest.raises(zoo.WeightsFileError, match="truncated"):
        zoo.read_header(cut)


def test_onnx_header_reader_matches_onnx(tmp_path):
    """The stdlib reader against onnx's own parser, on a file with weights and several opsets."""
    from export.onnx_header import read_onnx_header

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], torch.randn(12).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )  # fmt: skip
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
        producer_name="p",
        producer_version="9",
    )
    helper.set_model_props(model, {"zoo": "{}", "other": "x"})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    header, proto = read_onnx_header(path), onnx.load(str(path))
    assert (header.producer_name, header.producer_version) == (proto.producer_name, proto.producer_version)
    assert header.opsets == [(o.domain, o.version) for o in proto.opset_import]
    assert header.metadata == {p.key: p.value for p in proto.metadata_props}
    assert [str(v) for v in header.inputs] == ["input float32 [batch, 4]"]
    assert [str(v) for v in header.outputs] == ["logits float32 [batch, 3]"]


def test_info_shows_what_the_run_recorded_and_json_gives_all_of_it():
    path = zoo.weights.pretrained_path("slim_resnet20")
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    train = zoo.read_header(path)["metadata"]["train"]
    assert lines["labels"] == "10: " + ", ".join(train["labels"])
    assert lines["input"] == "1 x 8 x 8 (channels x height x width)" and lines["normalise"] == "mean (0.5), std (0.5)"
    assert lines["training"].startswith(f"{train['steps']} steps") and f"seed {train['seed']}" in lines["training"]
    assert f"strategy={json.dumps(train['config']['strategy'])}" in lines["config"] and "seed=0" in lines["config"]
    as_json = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    record = json.loads(as_json.stdout)
    assert record["metadata"]["train"] == train and record["arch"] == "slim_resnet20"
    assert record["size_bytes"] == path.stat().st_size and len(record["sha256"]) == 64
