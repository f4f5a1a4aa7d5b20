"""`zoo train` and `zoo eval` end to end: files, metrics, exact resume, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app
from training.checkpoint import load_checkpoint
from training.trainer import TrainConfig, train

DIGITS_QUICK = ["--steps", "4", "--batch-size", "32", "--eval-every", "2"]


def _zoo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout)


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _without_timing(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in path.read_text().splitlines()
    ]


def _text_corpus(tmp_path: Path) -> Path:
    """A small real text corpus: zoo's own source."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(Path(zoo.__file__).parent.glob("*.py"))))
    return corpus


def test_train_writes_a_loadable_family_with_metrics_and_eval_reproduces_them(tmp_path):
    out = tmp_path / "run"
    done = _zoo("train", "slim_resnet20", *DIGITS_QUICK, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "width=0.25" in done.stdout

    model = zoo.load(out / "model.safetensors")
    metrics = model.zoo_metadata["metrics"]
    members = [{"width": w} for w in (0.25, 0.5, 0.75, 1.0)]
    assert [m["subnet"] for m in metrics] == members
    assert all(0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0 for m in metrics)
    train_info = model.zoo_metadata["train"]
    assert train_info["data"] == "digits" and train_info["strategy"] == "alternating" and train_info["steps"] == 4
    assert train_info["labels"] == [str(d) for d in range(10)] and train_info["wall_time_s"] > 0
    assert train_info["config"]["batch_size"] == 32 and train_info["seed"] == 0

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["subnet"]) for e in lines] == [(s, m) for s in (2, 4) for m in members]
    assert all(e["samples_per_s"] > 0 and "accuracy" in e and "loss" in e for e in lines)
    assert [{k: e[k] for k in ("subnet", "accuracy", "loss")} for e in lines[-4:]] == metrics

    shown = _zoo("eval", str(out / "model.safetensors"), "--json")
    assert shown.returncode == 0, shown.stderr
    evaluated = json.loads(shown.stdout)
    assert [e["subnet"] for e in evaluated] == members
    for got, recorded in zip(evaluated, metrics):
        assert got["accuracy"] == recorded["accuracy"]
        assert got["loss"] == pytest.approx(recorded["loss"], rel=1e-5)


def _image_folder(tmp_path: Path) -> Path:
    """Three classes of small real PNG files (streamed through timm's transforms in training)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in range(3):
        (tmp_path / "images" / f"class{label}").mkdir(parents=True)
        for i in range(12):
            pixels = (torch.rand(8, 8, 3, generator=generator) * 80 + 80 * label).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{label}" / f"{i}.png")
    return tmp_path / "images"


def _resume_case(kind: str, tmp_path: Path) -> dict:
    if kind == "resnet":
        return dict(model="slim_resnet20", strategy="alternating", widths=[0.5], steps=6, batch_size=32, eval_every=2)
    if kind == "layerwise":  # members drawn from the whole space, periodic batch-norm recalibration
        return dict(
            model="slim_resnet20",
            strategy="sandwich",
            space="layerwise",
            num_random=1,
            steps=6,
            batch_size=32,
            eval_every=2,
        )
    if kind == "augmented":  # 33 training images, 4 steps per epoch: the resumed part crosses an epoch; every
        # timm augmentation and mixup on; the whole run reads in-process, the two parts with 2 and 1 workers
        return dict(model="slim_resnet20", data=f"folder:{_image_folder(tmp_path)}", img_size=8, strategy="random",
                    steps=6, batch_size=8, eval_every=2, optimizer="adamw", lr=1e-3, workers=0,
                    aa="rand-m9-mstd0.5-inc1", reprob=0.5, mixup=0.8, cutmix=1.0)  # fmt: skip
    return dict(model="slim_gpt_nano", data=f"text:{_text_corpus(tmp_path)}", strategy="sandwich", space="layerwise",
                widths=[0.25, 0.5, 0.75], num_random=1, seq_len=32, steps=6, batch_size=4, eval_every=2, eval_limit=8,
                warmup_steps=2)  # fmt: skip


@pytest.mark.parametrize("kind", ["resnet", "layerwise", "augmented", "gpt"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(kind, tmp_path, exactness_device):
    case = {**_resume_case(kind, tmp_path), "device": exactness_device}  # ZOO_TEST_DEVICE, see conftest.py
    whole = train(TrainConfig.from_flags(out=str(tmp_path / "whole"), **case))
    workers = {"workers": 2} if kind == "augmented" else {}
    interrupted = train(TrainConfig.from_flags(out=str(tmp_path / "parts"), stop_after=3, **{**case, **workers}))
    assert not interrupted.finished and interrupted.model_path is None
    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["step"] == 3
    workers = {"workers": 1} if kind == "augmented" else {}
    resumed = train(TrainConfig.from_flags(out=str(tmp_path / "parts"), resume=True, **{**case, **workers}))
    assert resumed.finished and resumed.steps == whole.steps == 6

    expected, got = load_file(whole.model_path), load_file(resumed.model_path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert _without_timing(tmp_path / "parts" / "metrics.jsonl") == _without_timing(
        tmp_path / "whole" / "metrics.jsonl"
    )


def test_a_killed_run_resumes_bit_identical(tmp_path):
    """SIGKILL at an arbitrary moment leaves a usable checkpoint (written atomically)."""
    args = ["--steps", "30", "--batch-size", "16", "--ckpt-every", "1", "--eval-every", "100"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "train", "slim_resnet20", *args, "--out", str(tmp_path / "killed")]
    )
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert load_checkpoint(checkpoint)["step"] < 30  # it was interrupted mid-run
    resumed = _invoke("train", "slim_resnet20", *args, "--out", str(tmp_path / "killed"), "--resume")
    assert resumed.exit_code == 0, resumed.output
    whole = train(
        TrainConfig.from_flags(
            model="slim_resnet20", out=str(tmp_path / "whole"), steps=30, batch_size=16, ckpt_every=1, eval_every=100
        )
    )
    expected, got = load_file(whole.model_path), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = _invoke(
        "train",
        "slim_resnet20",
        "--lr",
        "1e30",
        "--steps",
        "6",
        "--batch-size",
        "32",
        "--ckpt-every",
        "1",
        "--out",
        str(out),
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss is ") and "at step" in lines[0] and "member" in lines[0]
    state = load_checkpoint(out / "checkpoint.pt")
    assert 1 <= state["step"] < 6 and not (out / "model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.parametrize(
    "args, message",
    [
        (["no_such_model"], "unknown model"),
        (["slim_resnet20", "--width", "0"], "width must be in (0, 1]"),
        (["slim_resnet20", "--width", "1.5"], "width must be in (0, 1]"),
        (["slim_resnet20", "--rank", "0.5"], "--rank needs --low-rank"),
        (["slim_resnet20", "--steps", "5", "--epochs", "1"], "not both"),
        (["slim_resnet20", "--strategy", "separate", "--width", "0.5", "--width", "1"], "exactly one member"),
        (["slim_resnet20", "--data", "cifar10:/no/such/folder"], "data path not found"),
        (["slim_resnet20", "--data", "imagenet"], "unknown data spec"),
        (["slim_resnet20", "--data", "stdlib"], "reads image"),
        (["slim_resnet20", "--resume"], "no checkpoint"),
        (["slim_resnet20", "--init", "/no/such.safetensors"], "no such weights file"),
        (["slim_resnet20", "--steps", "0"], "--steps must be at least 1"),
        (["slim_resnet20", "--batch-size", "5000"], "larger than the training split"),
        (["slim_resnet20", "--workers", "-1"], "--workers must be non-negative"),
        (["slim_resnet20", "--img-size", "0"], "--img-size must be at least 1"),
        (["slim_resnet20", "--mixup", "-0.2"], "--mixup must be non-negative"),
        (["slim_resnet20", "--cutmix", "-1"], "--cutmix must be non-negative"),
        (["slim_gpt_nano", "--mixup", "0.8"], "mix images; slim_gpt_nano reads tokens"),
        (["slim_resnet20", "--mixup", "0.8", "--batch-size", "31", "--steps", "2"], "must be even, got 31"),
        (["slim_resnet20", "--aa", "rand-m9"], "configure timm's transforms of folder:PATH images; 'digits' is not"),
        (["slim_resnet20", "--data", "folder:/", "--aa", "fancy"], "--aa 'fancy' is not a timm auto-augment policy"),
        (
            ["slim_resnet20", "--data", "folder:/", "--aa", "rand-z9"],
            "--aa 'rand-z9' is not a timm auto-augment policy",
        ),
        (["slim_resnet20", "--data", "folder:/", "--reprob", "1.5"], "--reprob must be in [0, 1], got 1.5"),
        (["slim_resnet20", "--data", "folder:/", "--crop-pct", "0"], "--crop-pct must be in (0, 1], got 0.0"),
        (["slim_resnet20", "--data", "folder:/", "--crop-pct", "1.2"], "--crop-pct must be in (0, 1], got 1.2"),
        (["slim_resnet20", "--data", "cifar10:/", "--reprob", "0.2"], "'cifar10:/' is not an image folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args, message, tmp_path):
    result = _invoke("train", *args, "--out", str(tmp_path / "run"))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0]


def test_cuda_without_cuda_is_an_error_not_a_fallback(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _invoke("train", "slim_resnet20", "--device", "cuda", "--out", str(tmp_path / "run"))
    assert result.exit_code == 1 and "CUDA is not available" in result.stderr


def test_init_must_be_the_same_architecture(tmp_path):
    zoo.save(zoo.create_model("slim_resnet56", num_classes=10, in_chans=1, img_size=8), tmp_path / "r56.safetensors")
    result = _invoke(
        "train",
        "slim_resnet20",
        "--init",
        str(tmp_path / "r56.safetensors"),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.exit_code == 1 and "holds slim_resnet56 weights, but this run trains slim_resnet20" in result.stderr
    zoo.save(
        zoo.create_model("slim_resnet20", num_classes=100, in_chans=1, img_size=8), tmp_path / "r20c100.safetensors"
    )
    result = _invoke(
        "train",
        "slim_resnet20",
        "--init",
        str(tmp_path / "r20c100.safetensors"),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run2"),
    )
    assert result.exit_code == 1 and "does not fit slim_resnet20" in result.stderr and "fc.weight" in result.stderr


def test_resume_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "run")
    assert (
        _invoke(
            "train", "slim_resnet20", "--steps", "4", "--stop-after", "1", "--batch-size", "32", "--out", out
        ).exit_code
        == 0
    )
    result = _invoke(
        "train", "slim_resnet20", "--steps", "4", "--batch-size", "32", "--lr", "0.05", "--out", out, "--resume"
    )
    assert result.exit_code == 1 and "lr=0.1 (now 0.05)" in result.stderr
    result = _invoke("train", "slim_resnet20", "--steps", "4", "--batch-size", "32", "--out", out)
    assert result.exit_code == 1 and "holds an unfinished run; pass --resume to continue it" in result.stderr


def test_bad_choices_exit_2_without_traceback(tmp_path):
    result = _invoke("train", "slim_resnet20", "--strategy", "greedy", "--out", str(tmp_path))
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_eval_errors_are_one_line(tmp_path):
    result = _invoke("eval", str(tmp_path / "missing.safetensors"))
    assert result.exit_code == 1 and result.stderr.strip().startswith("error: no such weights file")
    result = _invoke("eval", "slim_resnet56", "--pretrained")  # no weights are shipped for it
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no pretrained weights are shipped for slim_resnet56" in result.stderr
    weights = tmp_path / "fresh.safetensors"
    zoo.save(zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8, widths=[0.5, 1.0]), weights)
    for args, message in [
        (["--data", "stdlib"], "reads image, but data 'stdlib' holds tokens"),
        (["--member", '{"depth": [4, 3, 3]}'], "depth of stage 0 must be an integer in [1, 3], got 4"),
        (["--rank", "0.5"], "no rank axis"),
    ]:
        result = _invoke("eval", str(weights), *args)
        assert result.exit_code == 1 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.output
        assert message in result.stderr
    result = _invoke(
        "eval", str(weights), "--width", "0.25", "--json", "--limit", "20"
    )  # untrained: recalibrated first
    assert result.exit_code == 0 and "recalibrated for 1 untrained member" in result.stderr
    assert [r["subnet"] for r in json.loads(result.stdout)] == [{"width": 0.25}]
    result = _invoke("eval", str(weights), "--json", "--limit", "20")  # no metadata: the grid, on digits
    assert result.exit_code == 0 and [r["subnet"] for r in json.loads(result.stdout)] == [
        {"width": 0.5},
        {"width": 1.0},
    ]
