"""`zoo eval` shows progress while it runs, and byte models are evaluated in cache-sized batches
(benchmarks/bench_eval.py measures the speed) without changing the metric."""

from __future__ import annotations

import json

import pytest
from torch.utils.data import Subset
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from training.evaluate import default_batch_size, evaluate
from training.model_data import data_for


@pytest.fixture(scope="module")
def gpt():
    model = zoo.create_model("slim_gpt_nano", pretrained=True)
    members = [zoo.Member.from_dict(r["subnet"]) for r in model.zoo_metadata["metrics"]]
    return model, members, Subset(data_for(model, "evaluate").val, range(12))


def test_evaluate_reports_progress_up_to_items_times_members(gpt):
    model, members, windows = gpt
    calls = []
    with_progress = evaluate(
        model, windows, members, batch_size=5, progress=lambda done, total: calls.append((done, total))
    )
    assert [done for done, _ in calls] == sorted(done for done, _ in calls) and calls[-1] == (12 * 4, 12 * 4)
    assert len(calls) == 3 * len(members)  # batches of 5, 5 and 2 windows, through every member
    assert with_progress == evaluate(model, windows, members, batch_size=5)


def test_byte_models_evaluate_in_8192_byte_batches_with_the_same_metric(gpt):
    model, members, windows = gpt
    assert default_batch_size(model) * model.context_length == 8192
    small, large = (evaluate(model, windows, members, batch_size=b) for b in (2, 12))
    for a, b in zip(small, large):
        assert a["subnet"] == b["subnet"] and a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-6)


def test_zoo_eval_prints_progress_on_stderr_and_keeps_stdout_clean():
    result = CliRunner().invoke(
        app, ["eval", "slim_gpt_nano", "--pretrained", "--limit", "8", "--batch-size", "2", "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 5 and all(line.startswith("evaluating slim_gpt_nano (4 members): ") for line in lines)
    assert lines[-1].split(": ")[1].startswith("100% after ")


def test_the_training_bar_keeps_steps_loss_and_times_at_80_columns():
    """On a narrow terminal the description gives way, not the step count or the ETA."""
    import io
    import re

    from rich.console import Console

    from cli.train_commands import _Progress

    lines = {}
    for width in (80, 120):
        buffer = io.StringIO()
        progress = _Progress(Console(file=buffer, width=width, force_terminal=True, color_system=None))
        progress.start(600, 0, "slim_resnet20 alternating (5 members)", 128)
        for step in (1, 2, 3):
            progress.step(step, 1.2345, 0.1)
        progress.progress.refresh()
        progress.finish()
        lines[width] = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buffer.getvalue()).replace("\r", "\n").splitlines()[-1]
    for width, line in lines.items():
        assert len(line) <= width and re.search(r" 3/600 loss 1\.2345 [\d,]+/s \d+:\d\d:\d\d \d+:\d\d:\d\d$", line), (
            line
        )
    assert lines[120].startswith("slim_resnet20 alternating (5 members)") and "…" in lines[80]
