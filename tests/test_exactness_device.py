"""``ZOO_TEST_DEVICE`` chooses where the exactness tests train (tests/conftest.py); a device
that is not there stops the run at once with one line, before any test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pytest_with(device: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZOO_TEST_DEVICE": device}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--collect-only",
        "tests/test_masking.py",
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_without_cuda_is_a_usage_error():
    done = _pytest_with("cuda")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert "ZOO_TEST_DEVICE=cuda but torch.cuda.is_available() is False here" in done.stderr


def test_a_device_torch_does_not_know_is_a_usage_error():
    done = _pytest_with("gpu0")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR and "ZOO_TEST_DEVICE: " in done.stderr
