"""`zoo bench`: every member sliced, exported and timed in PyTorch and onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from zoo.members import calibrate_members, select_members

ACCURACY = {0.5: 0.81, 1.0: 0.9}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    family = zoo.create_model("slim_resnet20", widths=[0.5, 1.0])
    metrics = [{"subnet": {"width": w}, "accuracy": a, "loss": 0.5} for w, a in ACCURACY.items()]
    return zoo.save(family, tmp_path_factory.mktemp("bench") / "r20.safetensors", metadata={"metrics": metrics})


def test_bench_prints_a_row_per_member_and_writes_a_png(weights, tmp_path):
    plot = tmp_path / "plots" / "r20.png"
    result = CliRunner().invoke(
        app, ["bench", str(weights), "--batch-size", "2", "--repeats", "2", "--threads", "1", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip().startswith("w")}
    assert sorted(rows) == ["w0.5", "w1"]
    assert rows["w0.5"][3:5] == ["0.81", "accuracy"]
    latencies = [float(v) for v in rows["w1"][5:9]]  # torch b1, ort b1, torch b2, ort b2
    assert all(ms > 0 for ms in latencies)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000
    assert not list(plot.parent.glob(".*tmp*"))  # written atomically, nothing left behind


def test_bench_json_has_sizes_flops_latencies_and_metrics_and_draws_a_bar_on_a_terminal(weights):
    result = CliRunner().invoke(
        app,
        ["bench", str(weights), "--width", "0.5", "--batch-size", "3", "--repeats", "1", "--threads", "1", "--json"],
        env={"FORCE_COLOR": "1"},
    )
    assert result.exit_code == 0, result.output
    assert "benchmarking slim_resnet20 (1 members)" in result.stderr  # the progress bar, beside the JSON
    report = json.loads(result.stdout)
    assert {"weights", "arch", "threads", "batch_sizes", "repeats", "members"} <= set(report)
    assert report["arch"] == "slim_resnet20" and report["batch_sizes"] == [1, 3] and report["threads"] == 1
    (member,) = report["members"]
    family = zoo.load(weights)
    sliced = zoo.slice(family, width=0.5)
    assert member["subnet"] == {"width": 0.5}
    assert member["params"] == sum(p.numel() for p in sliced.parameters())
    assert member["flops"] == zoo.count_flops(sliced) < zoo.count_flops(zoo.slice(family, width=1.0))
    assert (member["metric_name"], member["metric"]) == ("accuracy", 0.81)
    for runtime in ("pytorch", "onnxruntime"):
        assert set(member["latency_ms"][runtime]) == {"1", "3"}
        assert all(ms > 0 for ms in member["latency_ms"][runtime].values())


def test_members_default_to_the_trained_grid_are_validated_and_untrained_ones_recalibrated():
    family = zoo.create_model("slim_resnet20", low_rank=True, widths=[0.5, 1.0], ranks=[0.25, 1.0])
    assert select_members(family) == family.members
    assert select_members(family, [1.0]) == [zoo.Member(1.0, 0.25), zoo.Member(1.0, 1.0)]
    assert select_members(family, None, [0.25]) == [zoo.Member(0.5, 0.25), zoo.Member(1.0, 0.25)]
    structured = {"width": [0.5, 1.0, 1.0], "rank": 0.25, "depth": [1, 3, 3]}
    assert select_members(family, members=[structured]) == [family.resolve_member(structured)]
    with pytest.raises(ValueError, match="width must be in"):
        select_members(family, [1.5])
    untrained = select_members(family, [0.75], [1.0])
    assert untrained == [zoo.Member(0.75, 1.0)] and family.needs_calibration(untrained[0])
    assert calibrate_members(family, untrained, [torch.randn(4, 3, 32, 32)]) == untrained
    assert not family.needs_calibration(untrained[0])


def test_bench_errors_are_one_line(weights, tmp_path):
    runner = CliRunner()
    cases = {
        "has no rank axis": ["--rank", "0.5"],
        "batch-norm statistics only for its trained members": ["--width", "0.3"],
        "ending in .png": ["--plot", str(tmp_path / "plot.jpg")],
    }
    for message, flags in cases.items():
        result = runner.invoke(app, ["bench", str(weights), "--repeats", "1", *flags])
        assert result.exit_code == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            result.output
        )
    missing = runner.invoke(app, ["bench", str(tmp_path / "missing.safetensors")])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: no such weights file")
    assert runner.invoke(app, ["bench", str(weights), "--repeats", "0"]).exit_code == 2


def test_bench_reports_progress_through_exports_and_repeats(weights):
    from export.benchmark import bench_family

    calls = []
    source = zoo.WeightsSource.open(weights)
    bench_family(source, source.model.members[:1], 2, 3, 1, lambda done, total: calls.append((done, total)))
    assert calls == [(done, 1 + 3) for done in range(1, 5)]  # 1 member exported, then 3 repeats
