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
