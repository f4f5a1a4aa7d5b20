"""Faults of the machine: a full disk, an unwritable folder, a signal, a second run, kill -9.

Real faults where the test can make them: a small tmpfs is a real full disk (mounting one
needs root; the tests that need it skip otherwise, and tests/test_full_disk.py makes the same
refusals for any user with the OS's file-size limit), a read-only tmpfs (or, without root, a
folder without write permission) an unwritable one, and signals go to real `zoo train`
processes.
"""

from __future__ import annotations

import os
import re
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
import training.setup as run_setup
import zoo
from cli.app import app
from training.checkpoint import load_checkpoint
from training.signals import DUPLICATE_WINDOW_S, Interrupted
from training.trainer import Reporter, TrainConfig, train
from zoo.fileio import LOCK_NAME, FolderInUse, WriteError, atomic_path, locked_folder

RUN = dict(model="slim_resnet20", widths=[0.5], steps=30, batch_size=8, eval_every=1000)
MODEL_ARGS = ["slim_resnet20", "--width", "0.5", "--eval-every", "1000"]  # 1000: no periodic checkpoint
RUN_ARGS = [*MODEL_ARGS, "--steps", "30", "--batch-size", "8"]
STOPPED = re.compile(r"^stopped at step (\d+) of (\d+); continue with --resume$")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes, and lock files, left in ``folder``."""
    return sorted(p.name for p in folder.rglob(".*"))


def _family(path: Path) -> Path:
    zoo.save(zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8), path)
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, options)`` mounts a tmpfs at ``tmp_path / name``; unmounted after the test."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True)


def _fill(folder: Path) -> None:
    """Write a filler file until the filesystem is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == 28  # ENOSPC
    finally:
        os.close(fd)


@pytest.fixture
def unwritable(tmp_path, tmpfs):
    """A folder no file can be written into: a read-only tmpfs as root, else a folder without
    write permission (root ignores permissions)."""
    if os.geteuid() == 0:
        return tmpfs("readonly", "size=64k,ro")
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o555)
    return folder


# ----- full disk, unwritable folder ---------------------------------------------------------------
def test_slice_to_a_full_disk_is_one_line_and_keeps_the_earlier_file(tmp_path, tmpfs):
    disk = tmpfs("disk", "size=300k")
    family = _family(tmp_path / "family.safetensors")
    target = disk / "small.safetensors"
    assert _invoke("slice", str(family), "--width", "0.25", "--out", str(target)).exit_code == 0
    before = target.read_bytes()
    _fill(disk)

    line = _one_error_line(_invoke("slice", str(family), "--width", "0.25", "--out", str(target)))
    assert line == f"error: cannot write {target}: No space left on device"
    assert target.read_bytes() == before  # the earlier good file is untouched
    assert _leftovers(disk) == []  # the temporary file is removed


def test_a_full_disk_during_training_keeps_the_last_checkpoint(tmp_path, tmpfs):
    """A disk with room for one checkpoint: the step-1 checkpoint is written, the step-2
    one (written beside it, then renamed) runs out of space."""
    args = [
        "slim_resnet20",
        "--width",
        "0.5",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--ckpt-every",
        "1",
        "--eval-every",
        "100",
    ]
    assert _invoke("train", *args, "--stop-after", "1", "--out", str(tmp_path / "probe")).exit_code == 0
    size = (tmp_path / "probe" / "checkpoint.pt").stat().st_size
    disk = tmpfs("disk", f"size={size * 3 // 2 // 1024}k")

    line = _one_error_line(_invoke("train", *args, "--out", str(disk / "run")))
    assert line == f"error: cannot write {disk / 'run' / 'checkpoint.pt'}: No space left on device"
    assert load_checkpoint(disk / "run" / "checkpoint.pt")["step"] == 1
    assert _leftovers(disk) == []  # no temporary checkpoint, and the lock is released


@pytest.mark.parametrize("where", ["readonly", "under a file"])
def test_unwritable_places_are_one_line_naming_the_file(where, tmp_path, unwritable):
    family = _family(tmp_path / "family.safetensors")
    if where == "readonly":
        target, cause = (
            unwritable / "small.safetensors",
            ("Read-only file system" if os.geteuid() == 0 else "Permission denied"),
        )
    else:
        (tmp_path / "file").write_text("not a folder")
        target, cause = tmp_path / "file" / "sub" / "small.safetensors", "Not a directory"

    line = _one_error_line(_invoke("slice", str(family), "--width", "0.5", "--out", str(target)))
    assert line == f"error: cannot write {target}: {cause}"
    line = _one_error_line(_invoke("train", *RUN_ARGS, "--out", str(target.parent / "run")))
    assert line == f"error: cannot write {target.parent / 'run' / LOCK_NAME}: {cause}"


def test_atomic_path_names_the_target_when_a_writer_wraps_the_os_error(tmp_path):
    """torch.save reports a failed write as a RuntimeError whose context is the OSError."""
    target = tmp_path / "out.bin"
    target.write_text("good")
    with pytest.raises(WriteError, match=f"^cannot write {re.escape(str(target))}: No space left on device$"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("file write failed") from None
    assert target.read_text() == "good" and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="not an OS failure"):  # other errors pass through unchanged
        with atomic_path(target):
            raise ValueError("not an OS failure")


@pytest.mark.slow  # the export past a file-size limit in test_full_disk.py runs in CI
def test_export_to_a_full_disk_is_one_line(tmp_path, tmpfs):
    disk = tmpfs("disk", "size=64k")
    family = _family(tmp_path / "family.safetensors")
    line = _one_error_line(
        _invoke("export", str(family), "--width", "0.25", "--no-verify", "--out", str(disk / "small.onnx"))
    )
    assert line == f"error: cannot write {disk / 'small.onnx'}: No space left on device"
    assert list(disk.iterdir()) == []


# ----- signals -----------------------------------------------------------------------------------
def _start(out: Path, *args: str, group: bool = False) -> subprocess.Popen:
    """A real `zoo train` process, returned once its training loop runs (metrics.jsonl exists).
    ``group``: in a process group of its own, as a terminal's foreground job."""
    command = [sys.executable, "-m", "cli", "train", *args, "--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.01)
    return process


def _stopped_at(process: subprocess.Popen, signum: int, group: bool = False) -> int:
    """Send ``signum`` (to the process group: as Ctrl-C does); check the exit code and the one
    line; return the step it stopped at."""
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("stopped")]
    assert len(lines) == 1 and STOPPED.match(lines[0]), stderr
    return int(STOPPED.match(lines[0])[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return load_file(train(TrainConfig.from_flags(out=str(tmp_path_factory.mktemp("whole") / "run"), **RUN)).model_path)


# SIGTERM's case is slow (~30 s; the clean-clone suite passed 600 s): a SIGTERM checkpoints in
# test_a_signal_repeated_at_once_is_one_request and tests/test_exits.py in CI
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT])
def test_a_signal_checkpoints_the_step_reached_and_resume_is_bit_identical(signum, tmp_path, uninterrupted):
    """SIGTERM to the process, as a scheduler sends it; SIGINT to its whole process group, a
    data-loading worker included, as Ctrl-C sends it."""
    out, ctrl_c = tmp_path / "run", signum == signal.SIGINT
    step = _stopped_at(
        _start(out, *RUN_ARGS, *(["--workers", "1"] if ctrl_c else []), group=ctrl_c), signum, group=ctrl_c
    )
    assert 1 <= step < 30
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step  # --ckpt-every is 1000: this is the signal's
    assert not (out / "model.safetensors").exists() and not (out / LOCK_NAME).exists()

    resumed = _invoke("train", *RUN_ARGS, "--out", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output
    got = load_file(out / "model.safetensors")
    assert got.keys() == uninterrupted.keys()
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got)


class _Signaller(Reporter):
    """Sends this process SIGTERM after the given step, ``times`` times in a row."""

    def __init__(self, at_step: int, times: int = 1):
        self.at_step, self.times = at_step, times

    def step(self, step: int, loss: float, lr: float) -> None:
        if step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_repeated_at_once_is_one_request(tmp_path):
    """Ctrl-C reaches every process of the terminal and the launcher forwards it too."""
    result = train(
        TrainConfig.from_flags(out=str(tmp_path / "run"), **{**RUN, "steps": 10}), _Signaller(at_step=3, times=2)
    )
    assert result.stopped_by == signal.SIGTERM and result.steps == 3 and not result.finished
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3


def test_a_second_signal_while_checkpointing_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = run_setup.save_checkpoint

    def save_with_a_second_signal(path, state):
        if state["step"] == 3:  # the stop's checkpoint (periodic ones are at 2, 4, ...)
            time.sleep(DUPLICATE_WINDOW_S + 0.1)
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(path, state)

    monkeypatch.setattr(run_setup, "save_checkpoint", save_with_a_second_signal)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as stop:
        train(TrainConfig.from_flags(out=str(out), **{**RUN, "steps": 10, "ckpt_every": 2}), _Signaller(at_step=3))
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert (
        str(stop.value) == f"stopped at once by SIGTERM; {out / 'checkpoint.pt'} is as it was; continue with --resume"
    )
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert _leftovers(out) == []


def _processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass  # ended meanwhile
    return found


@pytest.mark.slow  # 30-50 s; CI runs a shorter two-process SIGTERM and resume: tests/test_two_processes.py
def test_sigterm_stops_every_process_of_a_two_process_run_at_one_step(tmp_path):
    out = tmp_path / "ddp"
    process = _start(out, *MODEL_ARGS, "--steps", "40", "--batch-size", "16", "--nproc-per-node", "2")
    step = _stopped_at(process, signal.SIGTERM)  # a rank that stopped at another step would hang rank 0
    assert 1 <= step < 40
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step
    assert _processes_naming(str(out)) == []  # no worker outlives the launcher


# ----- one run per folder ------------------------------------------------------------------------
def test_locked_folder_refuses_a_second_holder_and_names_the_first(tmp_path):
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    with locked_folder(folder, "zoo train"):
        with pytest.raises(
            FolderInUse, match=f"^{re.escape(str(folder))} is in use by process {os.getpid()} \\(zoo train\\);"
        ):
            with locked_folder(folder, "zoo export --all"):
                pass
    assert folder.is_dir() and not (folder / LOCK_NAME).exists()
    with locked_folder(folder, "again"):  # released
        pass
    with locked_folder(tmp_path / "unused", "nothing written"):
        pass
    assert not (tmp_path / "unused").exists()  # a folder it created and left empty is removed


def test_a_busy_folder_refuses_a_second_run_until_kill_9_ends_the_first(tmp_path):
    """Of two runs into one folder exactly one runs; the OS drops the lock with its holder."""
    out, family = tmp_path / "run", _family(tmp_path / "family.safetensors")
    first = _start(out, *MODEL_ARGS, "--steps", "1000", "--batch-size", "8")
    second = _invoke("train", *RUN_ARGS, "--out", str(out))
    assert _one_error_line(second).startswith(f"error: {out} is in use by process {first.pid} (zoo train);")
    export = _invoke("export", str(family), "--all", "--out", str(out))
    assert _one_error_line(export).startswith(f"error: {out} is in use by process {first.pid} (zoo train);")
    assert first.poll() is None  # the first run goes on

    first.kill()
    first.communicate()
    assert (out / LOCK_NAME).exists()  # the file stays behind, but not the lock
    with locked_folder(out, "test"):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()} test\n"
