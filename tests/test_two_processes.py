"""Short runs of two processes through torch's launcher: SIGTERM stops every rank at one step,
with data-loading workers, and the run resumes with another worker count to its end. The
full-size versions, which also compare the resumed weights with an uninterrupted run, are
``slow`` too (tests/test_faults.py, tests/test_streaming.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from test_faults import _processes_naming

from training.checkpoint import load_checkpoint

STOPPED = re.compile(r"^stopped at step (\d+) of (\d+); continue with --resume$")
ARGS = ["slim_resnet20", "--width", "0.5", "--eval-every", "1000", "--eval-limit", "64", "--steps", "60",
        "--batch-size", "8", "--nproc-per-node", "2"]  # fmt: skip


@pytest.mark.slow  # 30-53 s; CI keeps SIGTERM with a worker (tests/test_exits.py) and DDP (tests/test_loop.py)
def test_sigterm_stops_both_ranks_with_workers_at_one_step_and_the_run_resumes_with_other_workers(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "cli", "train", *ARGS, "--out", str(out)]
    process = subprocess.Popen([*command, "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists():  # the training loop runs
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler sends it
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    stops = [STOPPED.match(line) for line in stderr.splitlines() if line.startswith("stopped")]
    assert len(stops) == 1 and stops[0], stderr  # one line, though two ranks stopped
    step = int(stops[0][1])
    assert 1 <= step < 60 and load_checkpoint(out / "checkpoint.pt")["step"] == step
    assert _processes_naming(str(out)) == []  # no rank or worker outlives the launcher

    resumed = subprocess.run([*command, "--workers", "2", "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 60
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["subnet"]) for e in evaluations] == [(60, {"width": 0.5}), (60, {"width": 1.0})]
    assert load_file(out / "model.safetensors") and _processes_naming(str(out)) == []
