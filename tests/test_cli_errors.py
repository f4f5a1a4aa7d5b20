"""The CLI's error lines: issue 22's files answered in one line, and the last line of defence
(an exception no command expected is one line naming the command; ``ZOO_DEBUG=1`` shows the
traceback)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from test_fuzz_files import RECORD, SHIPPED, _onnx_file, _safetensors, _split
from typer.testing import CliRunner

import cli.export_commands
import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_info_on_the_files_of_issue_22_is_one_line(tmp_path):
    """An ONNX record ``[]`` and weights metrics ``["bad"]`` printed AttributeError tracebacks."""
    onnx_path = _onnx_file(tmp_path, [])
    header, data = _split(SHIPPED)
    record = json.loads(header["__metadata__"]["zoo"])
    record["metadata"]["metrics"] = ["bad"]
    weights = tmp_path / "bad.safetensors"
    weights.write_bytes(_safetensors({**header, "__metadata__": {"zoo": json.dumps(record)}}, data))
    for path, line in [
        (onnx_path, f"error: {onnx_path}: zoo metadata: must be an object, got a list []"),
        (weights, f"error: {weights} has a corrupt zoo header: metadata.metrics[0] must be an object, got 'bad'"),
    ]:
        result = invoke("info", path)
        assert result.exit_code == 1 and result.stderr == line + "\n", result.output


def test_the_installed_command_line_prints_the_one_line_too(tmp_path):
    """Through ``python -m cli`` (the `zoo` script's entry point), not Typer's test runner."""
    path = _onnx_file(tmp_path, [])
    env = {k: v for k, v in os.environ.items() if k != "ZOO_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "info", str(path)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {path}: zoo metadata: must be an object, got a list []\n"


def test_run_refuses_a_record_without_its_input_spec(tmp_path):
    """`zoo info` describes a record without ``input``; `zoo run` cannot preprocess for it."""
    path = _onnx_file(tmp_path, {k: v for k, v in RECORD.items() if k != "input"})
    assert invoke("info", path).exit_code == 0
    result = invoke("run", path, SHIPPED)
    assert result.exit_code == 1 and result.stderr == f"error: {path}: zoo metadata: input is missing\n"


def test_a_folder_whose_config_is_not_a_timm_config_is_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(SHIPPED.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"architecture": ["slim_resnet20"]}))
    result = invoke("info", tmp_path)
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {tmp_path / 'config.json'} is not a timm model config: architecture must be a string, "
        "got a list ['slim_resnet20']\n"
    )


def test_member_json_of_the_wrong_shape_is_one_line(tmp_path):
    result = invoke("slice", "slim_resnet20", "--pretrained", "--member", '{"width": [0.5, "x"]}', "--out", tmp_path)
    assert result.exit_code == 1
    assert result.stderr == "error: --member '{\"width\": [0.5, \"x\"]}': width[1] must be a number, got 'x'\n"


def test_a_safetensors_tensor_without_byte_range_is_one_line(tmp_path):
    header, data = _split(SHIPPED)
    name = next(k for k in header if k != "__metadata__")
    header[name] = {**header[name], "data_offsets": [0]}
    path = tmp_path / "cut.safetensors"
    path.write_bytes(_safetensors(header, data))
    result = invoke("info", path)
    assert result.exit_code == 1 and f"{name}.data_offsets must be a list of 2 items" in result.stderr
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] > 0


def _broken_weights_info(path):
    return {}["no such key"]  # a bug: an exception no command expects


def test_an_unexpected_exception_is_one_line_naming_the_command(monkeypatch):
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    monkeypatch.setattr(cli.export_commands, "_weights_info", _broken_weights_info)
    result = invoke("info", zoo.weights.pretrained_path("slim_resnet20"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        "internal error in `zoo info`: KeyError: 'no such key' -- a bug in zoo: please report it to zoo's issue "
        "tracker with the command line (rerun with ZOO_DEBUG=1 for the traceback)"
    ]


def test_zoo_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("ZOO_DEBUG", "1")
    monkeypatch.setattr(cli.export_commands, "_weights_info", _broken_weights_info)
    result = invoke("info", zoo.weights.pretrained_path("slim_resnet20"))
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and lines[0] == "Traceback (most recent call last):"
    assert "in _broken_weights_info" in result.stderr and "KeyError: 'no such key'" in lines[-2]
    assert lines[-1].startswith("internal error in `zoo info`: KeyError: 'no such key' -- a bug in zoo")
    assert "rerun with" not in lines[-1]


def test_flag_errors_still_exit_2(tmp_path):
    """The last line of defence leaves Typer's own errors alone (a bad flag value: exit 2)."""
    result = invoke("export", SHIPPED, "--all", "--width", "0.5", "--out", tmp_path)
    assert result.exit_code == 2 and "--all exports every trained member" in result.output


def test_run_refuses_a_record_that_contradicts_its_graph(tmp_path):
    """The graph takes 3 x 8 x 8 floats; onnxruntime's own error was a traceback."""
    tokens = _onnx_file(tmp_path, {**RECORD, "input": {"kind": "tokens", "context_length": 8}})
    result = invoke("run", tokens, "a prompt")
    assert result.exit_code == 1 and result.stderr == (
        f"error: {tokens}: its zoo metadata describes byte ids, but its graph takes tensor(float) ['batch', 3, 8, 8]\n"
    )
    larger = _onnx_file(tmp_path, {**RECORD, "input": {**RECORD["input"], "shape": [3, 16, 16]}})
    result = invoke("run", larger, SHIPPED)
    assert result.exit_code == 1 and "describes images of shape [3, 16, 16], but its graph takes" in result.stderr
