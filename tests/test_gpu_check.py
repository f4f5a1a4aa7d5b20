"""benchmarks/gpu_check.sh in CI: its --tiny dry run (every step but the exactness tests, on the
CPU, ResNet-20 and GPT-nano), the steps it skips without onnxruntime's CUDA provider, its time
budget and its fixed list of result files. The full dry run (ResNet-50, GPT-small, compiled
loops) is the slow test in tests/test_loop.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = {"summary.md", "steps.log", "environment.json", "image_loops.md", "image_loops.json", "text_loops.md",
                "text_loops.json", "predictor.json"}  # fmt: skip
CUDA_PROVIDER = "CUDAExecutionProvider" in ort.get_available_providers()


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _statuses(out: Path) -> dict[str, str]:
    rows = [line.split("|") for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    return {cells[1].strip(): cells[2].strip() for cells in rows[1:]}


@pytest.mark.slow  # ~32 s of CPU: the whole GPU check script, dry; run it before a GPU session
def test_the_tiny_dry_run_runs_every_step_and_skips_the_cuda_ones_without_the_provider(tmp_path):
    export_device = "cpu" if CUDA_PROVIDER else "cuda"  # without the provider: the skipping path
    done = _check("--cpu-dry-run", "--tiny", "--export-device", export_device, "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = _statuses(tmp_path)
    ran = ["environment", "images", "image_loops", "text", "text_loops", "zoo_train"]
    assert [statuses.pop(name) for name in ran] == ["ok"] * len(ran)
    assert statuses.pop("exactness") == "skipped: --tiny (run by the test suite itself)"
    if CUDA_PROVIDER:
        assert statuses == {"zoo_export": "ok", "predictor": "ok"}
    else:
        skipped = "skipped: CUDA provider not installed"
        assert statuses == {"zoo_export": skipped, "predictor": skipped}
    assert {p.name for p in tmp_path.iterdir()} <= RESULT_FILES
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["cpu"]["logical_cores"] >= 1 and environment["onnxruntime_providers"]
    for name, unit in (("image_loops", "images_per_s"), ("text_loops", "tokens_per_s")):
        loops = json.loads((tmp_path / f"{name}.json").read_text())["loops"]
        assert set(loops) == {"timm", "zoo"} and all(v[unit] > 0 for v in loops.values())


def test_the_check_keeps_to_its_time_budget_and_to_its_own_files(tmp_path):
    (tmp_path / "predictor.json").write_text("{}")  # a result of an earlier run
    done = _check("--cpu-dry-run", "--time-budget", "0", "--export-device", "cpu", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    statuses = _statuses(tmp_path)
    assert set(statuses.values()) == {"skipped: out of time"} and "zoo_train" in statuses and "predictor" in statuses
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.log", "summary.md"]  # the old result is gone

    (tmp_path / "notes.txt").write_text("mine")
    done = _check("--cpu-dry-run", "--out-dir", str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds notes.txt, which is not a result of this check; give an empty folder with --out-dir"
    ]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "summary.md").exists()
