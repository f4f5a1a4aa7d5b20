"""The catalogue's facts as data (zoo/catalogue.py) against the real models and shipped files,
the shipped weights as timm pretrained tags, and "did you mean" for unknown names."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from zoo import catalogue
from zoo.catalogue import MODELS, PRETRAINED


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_catalogue_names_every_registered_model():
    assert sorted(MODELS) == zoo.list_models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_catalogue_facts_match_the_model(name):
    facts = MODELS[name]
    with torch.device("meta"):  # shapes only
        dense = zoo.create_model(name)
        if facts["axes_low_rank"] is None:  # a dense-only family refuses low_rank in one line
            with pytest.raises(ValueError, match="low-rank"):
                zoo.create_model(name, low_rank=True)
        low = zoo.create_model(name, low_rank=True) if facts["axes_low_rank"] else dense
    assert facts["family"] == zoo.family_of(name)
    assert facts["input"] == dense.input_kind
    assert facts["batchnorm"] == dense.uses_batchnorm
    assert (facts["params"], facts["params_low_rank"] or _params(dense)) == (_params(dense), _params(low))
    assert (facts["axes"], facts["axes_low_rank"] or facts["axes"]) == (dense.axes, low.axes)
    for model, low_rank in ((dense, False), (low, bool(facts["axes_low_rank"]))):
        assert model.describe_space().startswith(f"{name}: {catalogue.space(name, low_rank)}; ")


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_pretrained_facts_match_the_shipped_file(name):
    model = zoo.create_model(name, pretrained=True)
    facts, train = PRETRAINED[name], model.zoo_metadata["train"]
    assert facts["tag"] == train["data"]
    assert facts["num_classes"] == model.num_classes
    assert tuple(facts["input_size"]) == tuple(model.pretrained_cfg["input_size"])
    if model.input_kind == "image":
        assert (tuple(facts["mean"]), tuple(facts["std"])) == (tuple(train["mean"]), tuple(train["std"]))


def test_timm_lists_the_shipped_image_weights_as_pretrained_tags():
    listed = timm.list_models("slim_*", pretrained=True)
    assert listed == sorted(
        f"{name}.{facts['tag']}" for name, facts in PRETRAINED.items() if MODELS[name]["input"] == "image"
    )
    assert "slim_resnet18" not in timm.list_models("slim_*", pretrained=True, exclude_filters=["*.*"])
    # the byte-level GPTs are zoo's only: timm's registry and its tools are for images
    assert (
        timm.list_models("slim_gpt*") == []
        and zoo.create_model("slim_gpt_nano", pretrained=True).input_kind == "tokens"
    )


@pytest.mark.parametrize("name", ["slim_resnet20", "slim_vit_tiny"])
def test_timm_creates_a_pretrained_tag_from_the_local_file(name):
    tag = f"{name}.{PRETRAINED[name]['tag']}"
    via_timm = timm.create_model(tag, pretrained=True)
    ours = zoo.create_model(name, pretrained=True)
    assert via_timm.pretrained_cfg["tag"] == PRETRAINED[name]["tag"]
    theirs = via_timm.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in ours.state_dict().items())
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):
        timm.create_model(f"{name}.imagenet", pretrained=True)


def test_timm_pretrained_cfg_overlay_loads_another_file(tmp_path):
    """A timm user points the cfg at a local file; zoo loads that file, not the shipped one."""
    torch.manual_seed(0)
    other = zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8)
    path = zoo.save(other, tmp_path / "other.safetensors")
    model = timm.create_model("slim_resnet20.digits", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(model.fc.weight, other.fc.weight)
    with pytest.raises(ValueError, match="not slim_resnet56"):
        timm.create_model("slim_resnet56", pretrained=True, pretrained_cfg_overlay={"file": str(path)})


@pytest.mark.parametrize(
    "typo, suggestion",
    [
        ("slim_resnt20", "did you mean slim_resnet20?"),
        ("slim_vit_tny", "did you mean slim_vit_tiny?"),
        ("resnet20", "did you mean slim_resnet20?"),
    ],
)
def test_unknown_names_get_the_closest_names(typo, suggestion):
    with pytest.raises(ValueError, match=re.escape(f"unknown model '{typo}'; {suggestion} known: ")):
        zoo.create_model(typo)
    result = CliRunner().invoke(app, ["info", typo, "--pretrained"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and suggestion in result.stderr


def test_no_suggestion_for_a_name_unlike_any():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known: slim_\w+, slim_"):
        zoo.create_model("nope")


def test_zoo_train_suggests_the_closest_name(tmp_path):
    result = CliRunner().invoke(app, ["train", "slim_resnet2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "did you mean slim_resnet20?" in result.stderr
    assert not (tmp_path / "run").exists()
