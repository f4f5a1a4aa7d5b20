"""The training configuration in parts, the `zoo train` options declared once, and the data a
model gets for each purpose (training.model_data.data_for)."""

from __future__ import annotations

from pathlib import Path

import pytest
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
