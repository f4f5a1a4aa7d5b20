"""A disk that refuses a write, as any user: the OS's file-size limit (``RLIMIT_FSIZE``).

A full disk (ENOSPC) needs a small filesystem, and mounting a tmpfs needs root (``mount(2)``
wants CAP_SYS_ADMIN); tests/test_faults.py does that and skips elsewhere. Any process may
lower its own soft file-size limit and raise it back up to the hard limit, and Python ignores
SIGXFSZ, so a write past the limit fails with EFBIG ("File too large"): a real refusal of the
OS in the middle of a write, at the same place in zoo's code (the atomic write's temporary
file) as a full disk. What it cannot make is a disk with room for one file and not two of the
same size, so the training case resumes a run under the limit instead of filling a disk.
"""

from __future__ import annotations

import contextlib
import re
import resource
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app
from training.checkpoint import load_checkpoint


@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes past ``size`` bytes fail with EFBIG in this process for the block."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python's default: EFBIG, not death
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < size:
        pytest.skip(f"the hard file-size limit here ({hard} bytes) is below what the test needs")
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes, and lock files, left in ``folder``."""
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture
def family(tmp_path) -> Path:
    torch.manual_seed(0)
    return zoo.save(
        zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8), tmp_path / "f.safetensors"
    )


def test_slice_past_the_limit_is_one_line_and_keeps_the_earlier_file(tmp_path, family):
    target = tmp_path / "out" / "small.safetensors"
    assert _invoke("slice", str(family), "--width", "0.25", "--out", str(target)).exit_code == 0
    before = target.read_bytes()
    with file_size_limit(len(before) // 2):
        result = _invoke("slice", str(family), "--width", "0.25", "--out", str(target))
    assert _one_error_line(result) == f"error: cannot write {target}: File too large"
    assert target.read_bytes() == before and _leftovers(target.parent) == []


def test_export_past_the_limit_is_one_line_and_leaves_nothing(tmp_path, family):
    out = tmp_path / "out"
    out.mkdir()
    with file_size_limit(16 * 1024):  # the member's weights alone are 70 kB
        result = _invoke("export", str(family), "--width", "0.25", "--no-verify", "--out", str(out / "small.onnx"))
    # the file is written in a work folder first (verified there); that write is the one refused
    work = re.escape(str(Path(tempfile.gettempdir()) / "zoo-export-"))
    assert re.fullmatch(f"error: cannot write {work}[^/]+/model.onnx: File too large", _one_error_line(result))
    assert list(out.iterdir()) == []


def test_a_checkpoint_past_the_limit_keeps_the_last_one(tmp_path):
    args = ["train", "slim_resnet20", "--width", "0.5", "--steps", "3", "--batch-size", "8", "--ckpt-every", "1",
            "--eval-every", "100", "--out", str(tmp_path / "run")]  # fmt: skip
    assert _invoke(*args, "--stop-after", "1").exit_code == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    with file_size_limit(checkpoint.stat().st_size // 2):  # the lock and metrics.jsonl stay far below it
        result = _invoke(*args, "--resume")
    assert _one_error_line(result) == f"error: cannot write {checkpoint}: File too large"
    assert load_checkpoint(checkpoint)["step"] == 1
    assert _leftovers(tmp_path / "run") == []  # no temporary checkpoint, and the lock is released
