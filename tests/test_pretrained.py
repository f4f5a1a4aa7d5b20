"""The shipped pretrained families (weights/): they load through zoo and timm with no network,
and reproduce the metrics recorded in their files (see weights/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from training.evaluate import evaluate
from training.model_data import data_for
from zoo.members import recorded_members

SHIPPED = ["slim_resnet20", "slim_gpt_nano", "slim_vit_tiny"]
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
METRIC = {"image": "accuracy", "tokens": "bits_per_byte"}


@pytest.fixture
def one_thread():
    """The recorded metrics were computed single-threaded: CPU sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_metrics(measured: list[dict], recorded: list[dict], metric: str) -> None:
    """Accuracy exactly; mean losses to float32 rounding, which differs between torch builds and
    CPU kernels (1.2e-6 relative on slim_resnet20's 0.0057 loss, torch 2.15 vs 2.14)."""
    assert [m["subnet"] for m in measured] == [r["subnet"] for r in recorded]
    for m, r in zip(measured, recorded):
        if metric == "accuracy":
            assert m["accuracy"] == r["accuracy"]  # a count of correct images
        else:
            assert m[metric] == pytest.approx(r[metric], rel=1e-5, abs=0)
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=0)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_loads_through_zoo_and_timm(name):
    path = zoo.weights.pretrained_path(name)
    assert path.is_file(), f"{name} is not shipped"
    header = zoo.read_header(path)
    assert header["arch"] == name and header["dtype"] == "float16"
    metadata = header["metadata"]
    assert metadata["command"].startswith(f"zoo train {name} ")
    model = zoo.create_model(name, pretrained=True)
    if model.input_kind == "image":  # timm's registry holds the image families
        via_timm = timm.create_model(name, pretrained=True)
        assert type(model) is type(via_timm)
        theirs = via_timm.state_dict()
        assert all(torch.equal(tensor, theirs[key]) for key, tensor in model.state_dict().items())
    members = recorded_members(model)
    assert [s.to_dict() for s in members] == [m["subnet"] for m in metadata["metrics"]]
    assert len(members) >= 2  # a family, not one model
    kind = model.input_kind
    assert all(
        METRIC[kind] in m and m[METRIC[kind]] == m[METRIC[kind]] for m in metadata["metrics"]
    )  # present, not NaN


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_reproduces_its_recorded_check_metrics(name, one_thread):
    model = zoo.create_model(name, pretrained=True)
    check = model.zoo_metadata["check"]
    val = data_for(model, "evaluate").val
    members = recorded_members(model)
    first = evaluate(model, val, members, 256, limit=check["items"])
    again = evaluate(model, val, members, 256, limit=check["items"])
    assert first == again
    assert_same_metrics(first, check["metrics"], METRIC[model.input_kind])


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "slim_gpt_nano"])
def test_zoo_eval_pretrained_prints_the_recorded_metrics(name, one_thread):
    result = CliRunner().invoke(app, ["eval", name, "--pretrained", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recorded = zoo.read_header(zoo.weights.pretrained_path(name))["metadata"]["metrics"]
    assert_same_metrics(json.loads(result.stdout), recorded, "accuracy")


@pytest.mark.slow
def test_zoo_eval_pretrained_gpt_prints_the_recorded_metrics(one_thread):
    """The whole stdlib validation split: minutes on a 2-core CPU."""
    result = CliRunner().invoke(app, ["eval", "slim_gpt_nano", "--pretrained", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recorded = zoo.read_header(zoo.weights.pretrained_path("slim_gpt_nano"))["metadata"]["metrics"]
    assert_same_metrics(json.loads(result.stdout), recorded, "bits_per_byte")


def test_shipped_weights_stay_small():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 20 * 2**20


def test_a_family_without_shipped_weights_is_refused_by_name():
    with pytest.raises(
        ValueError, match="no pretrained weights are shipped for slim_resnet56; shipped: .*slim_resnet20"
    ):
        zoo.create_model("slim_resnet56", pretrained=True)


def test_zoo_eval_of_a_catalogue_name_without_pretrained_says_to_add_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name in the working directory
    result = CliRunner().invoke(app, ["eval", "slim_resnet20"])
    assert result.exit_code == 1
    assert "add --pretrained" in result.output
