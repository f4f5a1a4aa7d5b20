"""zoo.from_timm and `zoo convert`: timm models and their checkpoints become exact families.

Real timm models with trained-looking batch norm (random statistics and affine parameters, so
that folding them wrongly would show), real files (safetensors, torch state dicts, timm's
Hub layout through ``timm.create_model("local-dir:...")``) and the real CLI.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from zoo import importance
from zoo.convert import plan_for, read_checkpoint
from zoo.layers import ElasticConv2d, ElasticLinear

IMG = 32
runner = CliRunner()
# name -> timm arguments; one of each supported kind, small enough for CI at 32 px
KINDS = {
    "resnet-basic": ("resnet18", dict(num_classes=10, in_chans=1)),
    "resnet-bottleneck": ("resnet50", dict(num_classes=10)),
    "mobilenetv2": ("mobilenetv2_050", dict(num_classes=10)),
    "vit": ("vit_tiny_patch16_224", dict(num_classes=10, img_size=IMG)),
}


def trained_looking(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model whose batch norms hold non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def sources() -> dict[str, torch.nn.Module]:
    return {kind: trained_looking(name, **kwargs) for kind, (name, kwargs) in KINDS.items()}


def _inputs(model: torch.nn.Module, n: int, seed: int = 1) -> torch.Tensor:
    channels = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, ElasticConv2d))).in_channels
    return torch.randn(n, channels, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _difference(source: torch.nn.Module, family: zoo.ElasticModel) -> float:
    family.eval().set_member(family.largest)
    source.eval()
    with torch.no_grad():
        return max((family(x) - source(x)).abs().max().item() for x in (_inputs(family, n, n) for n in (1, 2, 5)))


CASES = [(k, low, order) for k in KINDS for low in (False, True) for order in ("none", "weight")]
SLOW = {
    ("resnet-bottleneck", True, "none"),
    ("resnet-bottleneck", True, "weight"),
    ("resnet-basic", True, "none"),
    ("resnet-basic", True, "weight"),
}  # SVDs of 512 x 4608 matrices: seconds each; CNN low-rank in CI: MobileNetV2


@pytest.mark.parametrize(
    "kind, low_rank, order", [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]
)
def test_full_member_computes_what_timm_computes(sources, kind, low_rank, order):
    """Exact at full width and rank 1.0, with and without reordering, several batch sizes."""
    family = zoo.from_timm(sources[kind], order=order, low_rank=low_rank, img_size=IMG)
    assert family.low_rank == low_rank
    assert (
        family.arch
        == {
            "resnet-basic": "slim_resnet18",
            "resnet-bottleneck": "slim_resnet50",
            "mobilenetv2": "slim_mobilenetv2",
            "vit": "slim_vit_tiny",
        }[kind]
    )
    assert _difference(sources[kind], family) <= 1e-4
    assert family.zoo_metadata["converted_from"]["max_abs_diff"] <= 1e-4
    if low_rank:  # the factorized layers really are factorized, at full rank
        layers = [m for m in family.modules() if isinstance(m, (ElasticConv2d, ElasticLinear)) and m.low_rank]
        assert layers and all(m.v.shape[0] == min(m.u.shape[0], m.v[0].numel()) for m in layers)


def test_activation_order_is_exact_and_recalibrates_the_members(sources):
    batches = [_inputs(sources["resnet-basic"], 16, seed) for seed in range(3)]
    family = zoo.from_timm(
        sources["resnet-basic"], order="activation", calibration=batches, widths=[0.5, 1.0], img_size=IMG
    )
    assert _difference(sources["resnet-basic"], family) <= 1e-4
    assert [s.width for s in family.members] == [0.5, 1.0]
    assert family.zoo_metadata["converted_from"]["recalibrated"] == [{"width": 0.5}]
    with torch.no_grad():  # the narrower member has its own statistics and runs
        family.eval().set_member(width=0.5)
        assert family(batches[0]).shape == (16, 10)


@pytest.fixture(scope="module")
def dense_families(sources):
    """Full-width families (only the full member: batch-norm statistics all full-size)."""
    return {kind: zoo.from_timm(model, order="none", widths=[1.0], img_size=IMG) for kind, model in sources.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_permutation_of_every_coupled_dimension_leaves_the_function_unchanged(dense_families, kind):
    family = dense_families[kind]
    x = _inputs(family, 3)
    family.eval()
    with torch.no_grad():
        before = family(x)
        found = importance.couplings(family)
        generator = torch.Generator().manual_seed(0)
        for coupling in found:
            importance.permute(coupling, torch.randperm(coupling.units, generator=generator))
        after = family(x)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert {"resnet-basic": 12, "resnet-bottleneck": 37, "mobilenetv2": 24, "vit": 24}[kind] == len(found)
    heads = [c for c in found if c.name.endswith("heads")]
    assert all(c.unit_size == 64 and c.units == 3 for c in heads) or kind != "vit"  # whole heads of 64 features


@pytest.mark.parametrize("low_rank", [False, True], ids=["dense", "low-rank"])
def test_reorder_works_on_any_transformer_family_dense_or_factorized(low_rank):
    """zoo's own GPT too (the same blocks), and factorized layers (rows of u, columns of v)."""
    torch.manual_seed(0)
    model = zoo.create_model("slim_gpt_nano", context_length=16, low_rank=low_rank).eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(tokens)
        ranked = importance.reorder(model, "weight")
        after = model(tokens)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert len(ranked) == 8 and all(bool((s[1:] <= s[:-1]).all()) for s in ranked.values())


@pytest.mark.parametrize("kind", ["resnet-basic", "mobilenetv2", "vit"])  # the bottleneck's couplings: tested above
@pytest.mark.parametrize("order", ["weight", "activation"])
def test_importance_is_non_increasing_after_ordering(sources, kind, order):
    batches = [_inputs(sources[kind], 8, seed) for seed in range(2)]
    family = zoo.from_timm(sources[kind], order=order, calibration=batches, widths=[1.0], img_size=IMG)
    for coupling, score in zip(importance.couplings(family), importance.scores(family, order, batches)):
        assert bool((score[1:] <= score[:-1] * (1 + 1e-4) + 1e-6).all()), coupling.name


def test_weight_order_puts_a_dead_channel_last():
    """A residual channel that every writer zeroes contributes nothing, however large the
    weights reading it: it goes last, with every tensor coupled to it (the shortcut, the
    blocks' last convs and batch norms, the readers' columns)."""
    source = trained_looking("resnet18", num_classes=10, in_chans=1)
    with torch.no_grad():
        for bn in (source.layer2[0].bn2, source.layer2[1].bn2, source.layer2[0].downsample[1]):
            bn.weight[5] = 0.0
            bn.bias[5] = 0.0
        source.layer3[0].conv1.weight[:, 5] = 7.0  # a marker in the reader's column
    family = zoo.from_timm(source, order="weight", img_size=IMG)
    stage = family.stages[1]
    assert stage[0].bn2.weight[-1] == 0 and stage[1].bn2.weight[-1] == 0 and stage[0].shortcut[1].weight[-1] == 0
    assert bool((family.stages[2][0].conv1.weight[:, -1] == 7.0).all())
    assert _difference(source, family) <= 1e-4


def test_rank_prefixes_are_the_truncated_svd(sources):
    """Each rank prefix of a factorized layer is the best approximation of its size
    (Eckart-Young: the error is the norm of the dropped singular values)."""
    family = zoo.from_timm(sources["vit"], order="none", low_rank=True, img_size=IMG)
    source = sources["vit"].blocks[3].mlp.fc1.weight.detach().double()
    layer = family.blocks[3].mlp.fc1
    singular = torch.linalg.svdvals(source)
    for r in (8, 48, 192):
        approx = (layer.u[:, :r] @ layer.v[:r]).double()
        assert math.isclose(
            torch.linalg.norm(approx - source).item(), singular[r:].norm().item(), rel_tol=1e-4, abs_tol=1e-5
        )


@pytest.mark.parametrize(
    "name, kwargs, part",
    [
        ("resnet50d", {}, "the deep stem"),
        ("resnet50", dict(avg_down=True), "the downsampling shortcut of layer1.0"),
        ("seresnet18", {}, "squeeze-excitation (layer1.0.se)"),
        ("resnext50_32x4d", {}, "grouped convolutions"),
        ("resnet18", dict(global_pool="max"), "global pooling 'max'"),
        ("deit_tiny_distilled_patch16_224", {}, "the distillation token"),
        ("vit_tiny_patch16_224", dict(qk_norm=True), "qk-norm (blocks.0.attn)"),
        ("vit_tiny_patch16_224", dict(init_values=1e-5), "layer scale (blocks.0.ls1"),
        ("vit_tiny_patch16_224", dict(global_pool="avg"), "global pooling 'avg'"),
        ("vit_tiny_patch16_224", dict(reg_tokens=4), "4 register tokens"),
        ("efficientnet_b0", {}, "the activation SiLU"),
        ("convnext_atto", {}, "the ConvNeXt architecture"),
    ],
)
def test_unsupported_parts_are_refused_by_name(name, kwargs, part):
    """The hand-written families' planners name what they do not take (``zoo.from_timm`` then
    makes a graph family of it: tests/test_graph_family.py)."""
    with torch.device("meta"):  # only the structure is read
        model = timm.create_model(name, **kwargs)
    with pytest.raises(zoo.UnsupportedModel) as err:
        plan_for(model, name)
    message = str(err.value)
    assert "\n" not in message and f"cannot convert {name}: {part}" in message


@pytest.mark.parametrize(
    "name, arch",
    [
        ("resnet18", "slim_resnet18"),
        ("resnet34", "slim_resnet34"),
        ("resnet50", "slim_resnet50"),
        ("resnet101", "slim_resnet101"),
        ("resnet152", "slim_resnet152"),
        ("mobilenetv2_100", "slim_mobilenetv2"),
        ("vit_tiny_patch16_224", "slim_vit_tiny"),
        ("vit_small_patch16_224", "slim_vit_small"),
        ("vit_base_patch16_224", "slim_vit_base"),
        ("vit_large_patch16_224", "slim_vit_large"),
    ],
)
def test_every_timm_counterpart_plans_to_the_registered_variant_of_its_shape(name, arch):
    with torch.device("meta"):  # only the structure is read
        model = timm.create_model(name)
    assert plan_for(model, name).arch == arch


@pytest.mark.parametrize(
    "name, kwargs, zoo_has",
    [
        ("resnet26", {}, "slim_resnet18, slim_resnet34, slim_resnet50, slim_resnet101, slim_resnet152"),
        ("vit_tiny_patch16_224", dict(depth=6), "slim_vit_tiny, slim_vit_small, slim_vit_base, slim_vit_large"),
    ],
)
def test_a_layout_zoo_lacks_is_refused_naming_the_registered_variants(name, kwargs, zoo_has):
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    with pytest.raises(zoo.UnsupportedModel, match=f"zoo has {zoo_has}"):
        plan_for(model, name)


# ----- checkpoints ---------------------------------------------------------------------------
def test_a_safetensors_checkpoint_gives_classes_channels_and_image_size(tmp_path, sources):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in sources["vit"].state_dict().items()}, str(path))
    family = zoo.from_timm("vit_tiny_patch16_224", checkpoint=path)  # 10 classes, 32 px: from the shapes
    assert (family.num_classes, family.in_chans, family.pretrained_cfg["input_size"]) == (10, 3, (3, IMG, IMG))
    assert family.model_args["patch_size"] == 16
    assert _difference(sources["vit"], family) <= 1e-4
    assert family.zoo_metadata["converted_from"]["checkpoint"] == str(path)


def test_a_timm_training_checkpoint_loads_without_unpickling_code(tmp_path, sources):
    """timm's train.py saves {"state_dict": ..., "args": argparse.Namespace, ...}; DDP adds "module."."""
    state = {f"module.{k}": v for k, v in sources["resnet-basic"].state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    family = zoo.from_timm("resnet18", checkpoint=path, img_size=IMG)
    assert (family.num_classes, family.in_chans) == (10, 1)
    assert _difference(sources["resnet-basic"], family) <= 1e-4


class Payload:  # an object a checkpoint must not make zoo construct
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        (
            lambda p: torch.save({"model": Payload()}, p),
            r"holds more than tensors \(test_convert.Payload\) and was not unpickled",
        ),
        (lambda p: p.write_bytes(b"\x00" * 64), "is not a readable PyTorch checkpoint"),
        (lambda p: p.write_bytes(b"{"), "is not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_checkpoints_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    content(path)
    with pytest.raises(ValueError, match=message) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_checkpoint_of_another_architecture_names_the_first_differing_tensors(tmp_path, sources):
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in sources["resnet-basic"].state_dict().items()}, str(path))
    with pytest.raises(ValueError) as err:
        zoo.from_timm("resnet34", checkpoint=path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} does not fit resnet34: missing layer1.2.conv1.weight")
    assert "\n" not in message and "more)" in message


def test_batch_norm_members_below_full_width_need_calibration(sources):
    family = zoo.from_timm(sources["resnet-basic"], img_size=IMG)  # no data: only the full member
    assert family.members == [zoo.Member(width=1.0)]
    with pytest.raises(ValueError, match="has no batch-norm statistics for width=0.5"):
        family.eval().set_member(width=0.5)
    with pytest.raises(ValueError, match="need batch-norm statistics; give calibration data"):
        zoo.from_timm(sources["resnet-basic"], widths=[0.5], img_size=IMG)
    vit = zoo.from_timm(sources["vit"])  # LayerNorm: every member, no data needed
    assert [s.width for s in vit.members] == [0.25, 0.5, 0.75, 1.0]


# ----- timm's Hub layout ---------------------------------------------------------------------
def test_a_family_folder_loads_through_timm_local_dir_and_zoo_load(tmp_path, sources):
    family = zoo.from_timm(
        sources["mobilenetv2"],
        order="weight",
        calibration=[_inputs(sources["mobilenetv2"], 8)],
        widths=[0.5, 1.0],
        img_size=IMG,
    )
    folder = zoo.save_pretrained(
        family, tmp_path / "family", metadata={**family.zoo_metadata, "labels": [str(i) for i in range(10)]}
    )
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["architecture"] == "slim_mobilenetv2" and config["num_classes"] == 10 and config["global_pool"] == "avg"
    )
    assert config["model_args"] == family.model_args and config["label_names"][3] == "3"
    assert config["pretrained_cfg"]["input_size"] == [3, IMG, IMG] and config["zoo"]["members"] == [
        {"width": 0.5},
        {"width": 1.0},
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    via_zoo = zoo.load(folder).eval()
    x = _inputs(family, 2)
    family.eval()
    with torch.no_grad():
        for member in (0.5, 1.0):
            family.set_member(width=member), via_timm.set_member(width=member), via_zoo.set_member(width=member)
            assert torch.equal(via_timm(x), family(x)) and torch.equal(via_zoo(x), family(x))
    fresh = timm.create_model(f"local-dir:{folder}")  # timm's rule: pretrained=False builds the architecture only
    assert fresh.model_args == family.model_args and fresh.members == family.members
    assert zoo.read_header(folder)["arch"] == "slim_mobilenetv2"
    info = runner.invoke(app, ["info", str(folder)])
    assert info.exit_code == 0 and "converted    from timm mobilenetv2_050, order weight" in info.output

    config["model_args"]["num_classes"] = 3  # a folder whose config and weights disagree is refused
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(zoo.WeightsFileError, match="config.json describes slim_mobilenetv2 with other arguments"):
        zoo.load(folder)


# ----- the command ---------------------------------------------------------------------------


def test_zoo_convert_end_to_end_then_train_from_it(tmp_path, sources):
    """A timm ViT checkpoint -> `zoo convert` -> `zoo eval` and `zoo train --init` (whose
    architecture, patch 16 at 32 px, comes from the converted file)."""
    vit = trained_looking("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=IMG)
    checkpoint = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(checkpoint))
    out, folder = tmp_path / "family.safetensors", tmp_path / "family"
    result = runner.invoke(
        app,
        [
            "convert",
            "vit_tiny_patch16_224",
            "--checkpoint",
            str(checkpoint),
            "--calibrate",
            "digits",
            "--width",
            "0.5",
            "--out",
            str(out),
            "--save-dir",
            str(folder),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "into slim_vit_tiny" in result.output and "order: activation on 8 batches of digits" in result.output
    difference = float(result.output.split("max abs difference ")[1].split()[0])
    assert difference <= 1e-4
    family = zoo.load(out)
    assert family.zoo_metadata["data"] == "digits" and [s.width for s in family.members] == [0.5, 1.0]
    assert zoo.load(folder).model_args == family.model_args
    assert _difference(vit, family) <= 1e-4

    result = runner.invoke(app, ["eval", str(out), "--json", "--limit", "32"])
    assert result.exit_code == 0, result.output
    assert [r["subnet"] for r in json.loads(result.stdout)] == [{"width": 0.5}, {"width": 1.0}]

    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "slim_vit_tiny", "--init", str(out), "--img-size", str(IMG), "--steps", "2",
                                 "--batch-size", "16", "--width", "0.5", "--optimizer", "adamw", "--lr", "1e-4",
                                 "--eval-limit", "16", "--out", str(run),
                                 "--save-dir", str(tmp_path / "trained")])  # fmt: skip
    assert result.exit_code == 0, result.output
    trained = zoo.load(tmp_path / "trained")
    assert trained.model_args["patch_size"] == 16 and trained.pretrained_cfg["input_size"] == (1, IMG, IMG)


@pytest.mark.slow
def test_a_default_timm_resnet18_converts_on_digits_and_evaluates_without_data(tmp_path, monkeypatch):
    """The README's path for a checkpoint of one's own: RGB timm model, grey built-in data
    (repeated on three channels, resized to 32 px) for calibration and evaluation."""
    monkeypatch.chdir(tmp_path)
    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), "ckpt.safetensors")
    args = ["resnet18", "--checkpoint", "ckpt.safetensors", "--img-size", "32", "--calibrate", "digits"]
    result = runner.invoke(app, ["convert", *args, "--width", "0.5", "--out", "family.safetensors"])
    assert result.exit_code == 0, result.output
    family = zoo.load("family.safetensors")
    assert family.zoo_metadata["data"] == "digits" and family.zoo_metadata["mean"] == [0.5, 0.5, 0.5]
    assert family.pretrained_cfg["input_size"] == (3, 32, 32)
    result = runner.invoke(app, ["eval", "family.safetensors", "--json", "--limit", "32"])
    assert result.exit_code == 0, result.output
    assert [r["subnet"] for r in json.loads(result.stdout)] == [{"width": 0.5}, {"width": 1.0}]
    train = ["--img-size", "32", "--steps", "2", "--batch-size", "8", "--width", "0.5", "--eval-limit", "8"]
    result = runner.invoke(app, ["train", "slim_resnet18", "--init", "family.safetensors", *train, "--out", "run"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet50d", "--low-rank", "--out", "x.safetensors"], "error: cannot convert resnet50d: the deep stem"),
        (
            ["resnet18", "--checkpoint", "missing.pth", "--out", "x.safetensors"],
            "error: no such checkpoint: missing.pth",
        ),
        (["resnet_18", "--out", "x.safetensors"], "error: unknown timm model 'resnet_18'; did you mean"),
        (["resnet18"], "error: give --out FAMILY.safetensors, --save-dir DIR, or both"),
        (
            ["resnet18", "--order", "activation", "--out", "x.safetensors"],
            "error: order 'activation' needs calibration batches",
        ),
        (
            ["resnet18", "--in-chans", "2", "--calibrate", "stdlib", "--out", "x.safetensors"],
            "error: the model reads image, but data 'stdlib' holds tokens; pass --calibrate DATA with image",
        ),
    ],
)
def test_zoo_convert_refuses_in_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["convert", *args])
    assert result.exit_code == 1
    assert result.output.strip().startswith(message) and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()
