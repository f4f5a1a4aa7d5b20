"""Typos answer at once: a misspelled model, a missing or foreign file, a missing data path or bad
member JSON is refused before torch and timm load (they take seconds to import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Runs each command in one process, as `zoo` would, and reports its exit code and error line
# and whether torch had been imported by then.
SCRIPT = """
import contextlib, io, json, sys
from cli.app import app
reports = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            app(args)
        except SystemExit as exit:
            code = exit.code
    reports.append([code, err.getvalue().strip(), "torch" in sys.modules or "timm" in sys.modules])
print(json.dumps(reports))
"""

CASES = [
    (["train", "slim_resnet2O", "--out", "run"], "unknown model 'slim_resnet2O'; did you mean slim_resnet20?"),
    (["train", "slim_resnet20", "--init", "missing.safetensors", "--out", "run"], "no such weights file: missing"),
    (["train", "slim_resnet20", "--data", "folder:missing", "--out", "run"], "--data folder:missing: data path"),
    (["train", "slim_resnet20", "--member", "{width: 1}", "--out", "run"], "is not valid JSON"),
    (["eval", "missing.safetensors"], "no such weights file: missing.safetensors"),
    (["eval", "small.onnx"], "zoo eval takes a weights file (.safetensors) or a family"),
    (["eval", "slim_resnet20"], "add --pretrained for its shipped weights"),
    (["eval", "notes.txt"], "notes.txt is not a readable safetensors file"),
    (["slice", "missing.safetensors", "--width", "0.5", "--out", "x.safetensors"], "no such weights file"),
    (["export", "missing.safetensors", "--out", "x.onnx"], "no such weights file"),
    (["bench", "missing.safetensors"], "no such weights file"),
    (["search", "missing.safetensors", "--budget", "flops=1M", "--out", "s"], "no such weights file"),
    (["profile", "missing.safetensors"], "no such weights file"),
]


def test_typos_are_refused_before_torch_loads(tmp_path):
    (tmp_path / "small.onnx").write_bytes(b"\x08\x09")
    (tmp_path / "notes.txt").write_text("not weights")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = json.dumps([case for case, _ in CASES])
    done = subprocess.run([sys.executable, "-c", SCRIPT, args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    for (case, message), (code, error, heavy) in zip(CASES, reports):
        assert code == 1 and error.startswith("error: ") and message in error, (case, error)
        assert len(error.splitlines()) == 1, (case, error)
        assert not heavy, f"zoo {' '.join(case)} imported torch before refusing"
    assert "an exported ONNX file: run it with `zoo run small.onnx" in reports[5][1]
