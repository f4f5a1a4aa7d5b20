"""`zoo slice` and `zoo info`: real weights files in, real files (or one-line errors) out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from export.onnx_export import export_file
from zoo.weights import file_sha256

METRICS = [
    {"subnet": {"width": 0.5}, "accuracy": 0.625, "loss": 1.25},
    {"subnet": {"width": 1.0}, "accuracy": 0.75, "loss": 0.75},
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One OpenMP thread: layer initialisation (SVD) stalls with more on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def family(tmp_path):
    """A digits-shaped ResNet-20 family (1 x 8 x 8 inputs) trained, by definition, at widths 0.5 and 1."""
    torch.manual_seed(0)
    model = zoo.create_model("slim_resnet20", in_chans=1, img_size=8, widths=[0.5, 1.0]).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running_var" in name:
                buffer.uniform_(0.5, 2.0)
    return zoo.save(model, tmp_path / "family.safetensors", metadata={"metrics": METRICS, "data": "digits"})


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_slice_writes_a_smaller_standalone_file_with_provenance(family, tmp_path):
    out = tmp_path / "small.safetensors"
    result = invoke("slice", family, "--width", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size < 0.4 * family.stat().st_size

    small = zoo.load(out)  # loads on its own
    assert small.largest == zoo.Member(0.5) and small.members == [zoo.Member(0.5)]
    assert small.zoo_metadata["sliced_from"] == {
        "arch": "slim_resnet20",
        "subnet": {"width": 0.5},
        "source_sha256": file_sha256(family),
        "source_path": str(family.resolve()),
    }
    assert small.zoo_metadata["metrics"] == [METRICS[0]]
    full = zoo.load(family).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), zoo.use_member(full, 0.5):
        torch.testing.assert_close(small.eval()(x), full(x))
    assert "68,642 parameters" in result.output and "accuracy 0.6250" in result.output


def test_an_untrained_member_is_recalibrated_on_the_recorded_data_or_refused_without_it(family, tmp_path):
    out = tmp_path / "small.safetensors"
    result = invoke("slice", family, "--width", "0.75", "--out", out)
    assert result.exit_code == 0, result.output
    assert "recalibrated on digits (training split" in result.output
    assert zoo.load(out).zoo_metadata["bn_recalibration"]["data"].startswith("digits")

    header = zoo.read_header(family)
    bare = zoo.save(
        zoo.load(family), tmp_path / "bare.safetensors", metadata={"metrics": header["metadata"]["metrics"]}
    )  # no data recorded
    refused = invoke("slice", bare, "--width", "0.75", "--out", tmp_path / "refused.safetensors")
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1
    assert "width=0.5; width=1" in refused.stderr and "--calibrate" in refused.stderr
    assert not (tmp_path / "refused.safetensors").exists()


def test_calibrate_recalibrates_an_untrained_member_on_data(family, tmp_path):
    out = tmp_path / "small.safetensors"
    result = invoke("slice", family, "--width", "0.75", "--calibrate", "digits", "--out", out)
    assert result.exit_code == 0, result.output
    small = zoo.load(out)
    assert small.members == [zoo.Member(0.75)]
    assert small.zoo_metadata["bn_recalibration"] == {
        "batches": 8,
        "data": "digits (training split, no augmentation, up to 8 batches of 64)",
    }
    assert small.zoo_metadata["metrics"] == []
    variances = small.stem[1].running_var_w0p75
    assert not torch.allclose(variances, torch.ones_like(variances))  # estimated from data, not fresh

    # the statistics are those of the first 8 training batches (un-augmented digits)
    from training.data import batches, load_data

    reference = zoo.load(family)
    zoo.recalibrate_bn(reference, batches(load_data("digits").train, 64, limit=8), width=0.75)
    for name in ("running_mean_w0p75", "running_var_w0p75"):
        torch.testing.assert_close(getattr(small.stem[1], name), getattr(reference.stem[1], name))


def test_layernorm_families_slice_any_member(tmp_path):
    torch.manual_seed(0)
    weights = zoo.save(zoo.create_model("slim_gpt_nano", context_length=8), tmp_path / "gpt.safetensors")
    result = invoke("slice", weights, "--width", "0.6", "--out", tmp_path / "g.safetensors")
    assert result.exit_code == 0, result.output
    assert zoo.load(tmp_path / "g.safetensors").largest == zoo.Member(0.6)


@pytest.mark.parametrize(
    "case", ["random bytes", "foreign safetensors", "missing", "width out of range", "out is source"]
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(family, tmp_path, case):
    path, args = tmp_path / "in.safetensors", []
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    elif case == "foreign safetensors":
        save_file({"weight": torch.zeros(2, 2)}, str(path))
    elif case == "width out of range":
        path, args = family, ["--width", "1.5"]
    elif case == "out is source":
        path = family
    out = family if case == "out is source" else tmp_path / "out" / "s.safetensors"
    before = file_sha256(family)
    result = invoke("slice", path, *args, "--out", out)
    assert result.exit_code == (2 if case == "width out of range" else 1), result.output
    if case != "width out of range":
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists() and file_sha256(family) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


def test_info_describes_a_weights_file(family):
    result = invoke("info", family)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["architecture"] == "slim_resnet20 (family resnet, image input)"
    assert lines["members"] == "width=0.5; width=1"
    assert lines["parameters"] == f"{sum(p.numel() for p in zoo.load(family).parameters()):,}"
    assert "width=0.5: accuracy 0.6250 loss 1.2500" in result.output


def test_info_describes_an_onnx_file(family, tmp_path):
    onnx_path = export_file(family, tmp_path / "m.onnx", width=0.5).path
    result = invoke("info", onnx_path)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["inputs"] == "input float32 [batch, 1, 8, 8]"
    assert lines["outputs"] == "logits float32 [batch, 10]"
    assert lines["member"] == "width=0.5" and lines["parameters"] == "68,642"
    assert lines["opset"].startswith("ai.onnx ")
    assert lines["metrics"] == "accuracy 0.6250 loss 1.2500"
    assert f"sha256 {file_sha256(family)}" in result.output


@pytest.mark.parametrize(
    "name, content",
    [("junk.onnx", b"\x00not onnx at all" * 50), ("junk.safetensors", b"\x01" * 300), ("none.onnx", None)],
)
def test_info_on_corrupt_or_missing_files_is_one_line(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = invoke("info", path)
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (
        result.output
    )
