"""Every command that reads a weights file takes ``NAME --pretrained`` for the shipped weights,
the same way, and says so when the name is given without the flag."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from export.onnx_header import read_onnx_header, zoo_record
from zoo.weights import file_sha256

SHIPPED = zoo.weights.pretrained_path("slim_resnet20")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "command",
    [["slice", "--out", "x.safetensors"], ["export", "--out", "x.onnx"], ["bench"], ["info"], ["eval"]],
    ids=lambda c: c[0],
)
def test_a_catalogue_name_without_pretrained_says_to_add_it(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    result = invoke(command[0], "slim_resnet20", *command[1:])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "add --pretrained" in result.stderr
    result = invoke(command[0], "slim_resnet56", "--pretrained", *command[1:])
    assert result.exit_code == 1 and "no pretrained weights are shipped for slim_resnet56" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_slice_pretrained_by_name(tmp_path):
    out = tmp_path / "half.safetensors"
    result = invoke("slice", "slim_resnet20", "--pretrained", "--width", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    origin = zoo.read_header(out)["metadata"]["sliced_from"]
    assert origin["source_sha256"] == file_sha256(SHIPPED) and origin["arch"] == "slim_resnet20"


@pytest.mark.slow
def test_export_pretrained_by_name(tmp_path):
    out = tmp_path / "half.onnx"
    result = invoke("export", "slim_resnet20", "--pretrained", "--width", "0.5", "--no-verify", "--out", out)
    assert result.exit_code == 0, result.output
    record = zoo_record(read_onnx_header(out), out)
    assert record["source_sha256"] == file_sha256(SHIPPED) and record["subnet"] == {"width": 0.5}


@pytest.mark.slow
def test_bench_pretrained_by_name():
    result = invoke(
        "bench", "slim_resnet20", "--pretrained", "--width", "1", "--repeats", "1", "--batch-size", "1", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["arch"] == "slim_resnet20" and [m["subnet"] for m in report["members"]] == [{"width": 1.0}]
