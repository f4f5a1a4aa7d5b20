"""The training configuration in parts, the `zoo train` options declared once, and the data a
model gets for each purpose (training.model_data.data_for)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from PIL import Image

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app
from training.config import PARTS, TrainConfig
from training.data import load_data
from training.model_data import ModelInput, data_for

# The keys a run records (checkpoint "config", weights file metadata["train"]["config"]): a
# checkpoint written before the configuration was split resumes only if they stay the same.
RECORDED_KEYS = {
    "model", "out", "data", "strategy", "widths", "ranks", "extra_members", "space", "low_rank", "steps", "epochs",
    "batch_size", "lr", "optimizer", "weight_decay", "momentum", "nesterov", "warmup_steps", "clip_grad",
    "label_smoothing", "core_prob", "num_random", "update", "rho", "eg_lr", "keep", "meprop_units", "nested",
    "log_alignment", "seq_len", "img_size", "aa", "reprob", "crop_pct", "mixup", "cutmix", "init", "resume",
    "ckpt_every", "eval_every", "eval_limit", "stop_after", "seed", "device", "workers", "compile", "compile_backend",
    "channels_last", "amp", "accum_steps", "ema", "ema_decay", "sync_bn", "dist_timeout",
}  # fmt: skip


def test_each_flag_goes_to_one_part_and_the_record_keeps_its_keys():
    config = TrainConfig.from_flags("slim_resnet20", "run", widths=[0.5], update="sam", rho=0.1, data="digits",
                                    lr=0.05, accum_steps=2, sync_bn=True, seed=3)  # fmt: skip
    assert (config.members.widths, config.updates.rho, config.inputs.data) == ([0.5], 0.1, "digits")
    assert (config.optim.lr, config.loop.accum_steps, config.dist.sync_bn, config.seed) == (0.05, 2, True, 3)
    flags = config.flags()
    assert set(flags) == RECORDED_KEYS
    assert TrainConfig.from_flags(**flags) == config
    owners = [name for name in PARTS for f in PARTS[name].__dataclass_fields__ if f == "rho"]
    assert owners == ["updates"]
    with pytest.raises(TypeError, match="unknown training flag"):
        TrainConfig.from_flags("slim_resnet20", "run", widht=[0.5])


def test_every_training_flag_is_a_train_option_with_help():
    command = typer.main.get_command(app).commands["train"]
    options = {p.name: p for p in command.params}
    flags = set(TrainConfig.from_flags("slim_resnet20", "run").flags()) - {"model"}
    assert flags <= set(options), flags - set(options)
    assert all(p.help for p in command.params if p.name != "model")
    assert options["widths"].opts == ["--width"] and options["extra_members"].opts == ["--member"]
    assert options["low_rank"].opts == ["--low-rank"] and not options["low_rank"].secondary_opts


def _folder(root: Path) -> str:
    for k, (name, color) in enumerate({"red": (220, 20, 20), "blue": (20, 20, 220)}.items()):
        for i in range(6):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12 + i, 10), color).save(root / name / f"{k}{i}.png")
    return f"folder:{root}"


def test_data_for_each_purpose_reads_the_record_and_shapes_for_the_model(tmp_path):
    spec = _folder(tmp_path / "images")
    model = zoo.create_model("slim_resnet20", num_classes=2, img_size=16, widths=[0.5, 1.0])
    model.zoo_metadata = {"data": spec, "crop_pct": 0.5, "train": {"config": {"seed": 3}}}  # a top-level record
    evaluated = data_for(model, "evaluate")
    assert (evaluated.spec, evaluated.crop_pct, evaluated.input_size) == (spec, 0.5, (3, 16, 16))
    split = load_data(spec, seed=3, img_size=16)
    paths = [str(evaluated.val.files.path(i)) for i in range(len(evaluated.val))]
    assert paths == [str(split.val.files.path(i)) for i in range(len(split.val))]  # the recorded split seed
    unseeded = load_data(spec, seed=0, img_size=16).val
    assert paths != [str(unseeded.files.path(i)) for i in range(len(unseeded))]  # so the seed is what decided
    calibrated = data_for(model, "calibrate")
    assert calibrated.train.augment is False
    trained = data_for(ModelInput("slim_resnet20", "image"), "train", spec, seed=3)
    assert trained.train.augment is True

    other = zoo.create_model("slim_resnet20", num_classes=10, img_size=16, widths=[0.5, 1.0])
    other.zoo_metadata = model.zoo_metadata
    with pytest.raises(ValueError, match="has 10 classes, but data .* has 2"):
        data_for(other, "evaluate")
    assert data_for(other, "calibrate").num_classes == 2  # calibration reads inputs only
    gray = zoo.create_model("slim_resnet20", num_classes=2, in_chans=1, img_size=16)
    with pytest.raises(ValueError, match="reads 1-channel images, but data .* has 3-channel images"):
        data_for(gray, "calibrate", spec)


def test_grey_data_is_repeated_on_an_rgb_models_channels_and_sized_for_it():
    """Built-in digits (1 channel, 8 px) for a 3-channel 32-px model: the same image on every
    channel, normalised as recorded, where refusing would help no one."""
    model = zoo.create_model("slim_resnet20", num_classes=10, img_size=32, widths=[1.0])
    for purpose in ("evaluate", "calibrate"):
        bundle = data_for(model, purpose, "digits")
        image, label = bundle.val[5]
        grey, same_label = load_data("digits", img_size=32).val[5]
        assert bundle.input_size == (3, 32, 32) and image.shape == (3, 32, 32)
        assert torch.equal(image, grey.expand(3, 32, 32)) and int(label) == int(same_label)
        assert bundle.mean == (0.5, 0.5, 0.5) and bundle.std == (0.5, 0.5, 0.5)
    assert data_for(model, "calibrate", "digits").train.augment is False


@pytest.mark.parametrize(
    "purpose, flag, name, model_args",
    [
        ("evaluate", "--data", "slim_resnet20", dict(num_classes=7, img_size=8)),
        ("calibrate", "--calibrate", "slim_gpt_nano", {}),
    ],
)
def test_data_that_does_not_fit_names_the_flag_that_fixes_it(purpose, flag, name, model_args):
    model = zoo.create_model(name, widths=[1.0], **model_args)
    with pytest.raises(ValueError, match=f"; pass {flag} DATA with "):
        data_for(model, purpose, "digits")


def test_a_recorded_data_path_that_is_gone_says_where_it_came_from(tmp_path):
    model = zoo.create_model("slim_resnet20", num_classes=2, img_size=16, widths=[1.0])
    model.zoo_metadata = {"train": {"data": f"folder:{tmp_path / 'gone'}"}}
    with pytest.raises(FileNotFoundError, match="recorded in the weights file|the weights file records") as err:
        data_for(model, "calibrate")
    assert "pass --calibrate DATA" in str(err.value) and str(tmp_path / "gone") in str(err.value)
    with pytest.raises(FileNotFoundError) as given:  # a spec the user typed: nothing about the file
        data_for(model, "evaluate", f"folder:{tmp_path / 'gone'}")
    assert "weights file" not in str(given.value)


def test_a_relative_data_path_is_recorded_absolute_and_found_from_elsewhere(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    _folder(tmp_path / "project" / "shapes")
    args = ["--steps", "2", "--batch-size", "8", "--width", "0.5", "--img-size", "8", "--eval-limit", "4"]
    result = CliRunner().invoke(app, ["train", "slim_resnet20", "--data", "folder:shapes", *args, "--out", "run"])
    assert result.exit_code == 0, result.output
    weights = tmp_path / "project" / "run" / "model.safetensors"
    train = zoo.read_header(weights)["metadata"]["train"]
    assert train["data"] == f"folder:{tmp_path / 'project' / 'shapes'}" and train["config"]["data"] == "folder:shapes"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", str(weights), "--json"])
    assert result.exit_code == 0, result.output
    (tmp_path / "project" / "shapes").rename(tmp_path / "moved")
    result = CliRunner().invoke(app, ["eval", str(weights), "--width", "0.25"])
    assert result.exit_code == 1
    assert "(the data the weights file records); pass --data DATA" in result.output


def test_an_rgb_init_file_trains_on_grey_data_repeated_on_its_channels(tmp_path):
    """`zoo train --init` of a converted RGB model on the built-in digits, as the README shows."""
    from typer.testing import CliRunner

    rgb = zoo.create_model("slim_resnet20", num_classes=10, in_chans=3, img_size=8, widths=[0.5, 1.0])
    zoo.save(rgb, tmp_path / "rgb.safetensors")
    args = ["--steps", "2", "--batch-size", "8", "--width", "0.5", "--eval-limit", "8", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, ["train", "slim_resnet20", "--init", str(tmp_path / "rgb.safetensors"), *args])
    assert result.exit_code == 0, result.output
    trained = zoo.load(tmp_path / "run" / "model.safetensors")
    assert trained.pretrained_cfg["input_size"] == (3, 8, 8)
    assert trained.zoo_metadata["train"]["mean"] == [0.5, 0.5, 0.5]
