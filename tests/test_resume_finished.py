"""`zoo train --resume` of a run that already finished: it says so and leaves every file alone."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app

ARGS = ["train", "slim_resnet20", "--steps", "4", "--batch-size", "32", "--eval-every", "2", "--width", "0.5"]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_resume_of_a_finished_run_trains_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    first = CliRunner().invoke(app, [*ARGS, "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = _snapshot(out)
    wall = zoo.read_header(out / "model.safetensors")["metadata"]["train"]["wall_time_s"]

    again = CliRunner().invoke(app, [*ARGS, "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert "the run is already finished (4 steps in" in again.output and f"in {wall:.0f} s" in again.output
    assert "nothing was trained or rewritten" in again.output and "width=0.5" in again.output
    assert _snapshot(out) == before


def test_resume_after_the_last_checkpoint_but_before_the_weights_writes_them(tmp_path):
    """Killed between the final checkpoint and the weights file: resuming finishes the run."""
    out = tmp_path / "run"
    assert CliRunner().invoke(app, [*ARGS, "--out", str(out)]).exit_code == 0
    (out / "model.safetensors").unlink()
    again = CliRunner().invoke(app, [*ARGS, "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert "already finished" not in again.output and (out / "model.safetensors").is_file()


def test_training_into_a_finished_run_suggests_a_new_out_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(app, [*ARGS, "--out", str(out)]).exit_code == 0
    before = _snapshot(out)
    again = CliRunner().invoke(app, [*ARGS, "--out", str(out)])
    assert again.exit_code == 1
    assert "holds a finished run; choose a new --out, or pass --overwrite" in again.output
    assert "--resume" not in again.output and _snapshot(out) == before


def test_overwrite_starts_over_and_keeps_nothing_of_the_old_run(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(app, [*ARGS, "--ema", "--out", str(out)]).exit_code == 0
    assert (out / "model_ema.safetensors").exists()
    again = CliRunner().invoke(app, [*ARGS, "--seed", "1", "--out", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert "--overwrite: removed the old run's checkpoint.pt, model.safetensors, model_ema.safetensors" in again.output
    assert not (out / "model_ema.safetensors").exists()  # nothing of the old run is kept
    assert zoo.read_header(out / "model.safetensors")["metadata"]["train"]["seed"] == 1
    refused = CliRunner().invoke(app, [*ARGS, "--out", str(out), "--overwrite", "--resume"])
    assert refused.exit_code == 1 and "give one" in refused.output and (out / "model.safetensors").exists()
