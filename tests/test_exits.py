"""Every error exits: a run whose data-loading workers are alive when it fails, or is stopped,
exits non-zero with its one line, and leaves no process behind.

Each test runs a real `zoo` command in a process group of its own, makes it fail where workers
read (a corrupt or vanished file, a file that blocks its reader, as on a hung network mount),
and then checks the exit code, the last line of stderr and that nothing of the group is left.
The communicate() timeouts only catch a hang; no test measures how long anything took.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zoo
from training.workers import loader, running

HANG = 240  # seconds after which a command that should have exited is declared hung
SMALL = ["--img-size", "16", "--width", "0.5", "--batch-size", "4"]


def test_a_worker_leaves_stop_signals_from_others_to_its_parent_and_ends_on_the_parents_own():
    """The scheduler's SIGTERM and Ctrl-C's SIGINT (here from `kill`, another process) must not
    kill a worker mid-epoch; the parent's SIGTERM (torch's shutdown, Python's exit handler)
    must end it, even when it is busy."""
    with running(loader(list(range(64)), batch_size=1, num_workers=1)) as batches:
        assert next(batches).tolist() == [0]
        (worker,) = multiprocessing.active_children()
        for name in ("TERM", "INT"):
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
        assert [next(batches).item() for _ in range(40)] == list(range(1, 41))  # it lived on
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(timeout=HANG)
        assert worker.exitcode == 0


def _tree(root: Path, per_class: dict[str, int]) -> Path:
    """A class-per-folder tree with train/ and val/ of tiny RGB PNGs."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _start(*args: str) -> subprocess.Popen:
    """`zoo <args>` in a process group of its own (its id is the process's)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        state, _, group = text[text.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def _ended(process: subprocess.Popen, one_line: bool = True) -> tuple[int, str]:
    """Wait for the command (a hang fails the test), then for its group to be empty; return
    its exit code and the last line of its stderr (``one_line``: its only line)."""
    try:
        _, stderr = process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"the command hung after: {stderr.strip().splitlines()[-3:]}")
    deadline = time.monotonic() + HANG
    while _group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # a worker killed with its parent may take a moment to go
    assert _group(process.pid) == [], "processes left behind"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines() or [""]
    assert len(lines) == 1 or not one_line, stderr
    return process.returncode, lines[-1]


def _training(out: Path) -> None:
    """Wait until the run's training loop runs (it writes metrics.jsonl as it starts)."""
    while not (out / "metrics.jsonl").exists():
        time.sleep(0.02)


def test_a_corrupt_validation_image_is_one_line_and_the_run_exits(tmp_path):
    """The issue's case: the line was printed, then the evaluation worker kept the run alive."""
    tree = _tree(tmp_path / "tree", {"train": 4, "val": 2})
    (tree / "val" / "b" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    code, line = _ended(
        _start(
            "train",
            "slim_resnet20",
            "--data",
            f"folder:{tree}",
            *SMALL,
            "--steps",
            "2",
            "--workers",
            "2",
            "--out",
            str(tmp_path / "run"),
        )  # fmt: skip
    )
    assert code == 1
    assert line.startswith(f"error: cannot read image {tree / 'val' / 'b' / 'zz_bad.png'}: "), line


def test_training_images_damaged_during_the_run_are_one_line_and_the_run_exits(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": 4, "val": 1})
    out = tmp_path / "run"
    process = _start("train", "slim_resnet20", "--data", f"folder:{tree}", *SMALL, "--steps", "100000",
                     "--eval-every", "100000", "--workers", "2", "--out", str(out))  # fmt: skip
    _training(out)
    for image in (tree / "train").rglob("*.png"):
        image.write_bytes(b"damaged")
    code, line = _ended(process)
    assert code == 1
    assert line.startswith(f"error: cannot read image {tree / 'train'}/"), line


def test_a_text_cache_cut_short_during_the_run_is_one_line_and_the_run_exits(tmp_path):
    from training.text_cache import cached_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(Path(zoo.__file__).parent.glob("*.py"))))
    cache = cached_corpus(corpus)  # the file the run reads: built here, found there
    out = tmp_path / "run"
    process = _start("train", "slim_gpt_nano", "--data", f"text:{corpus}", "--seq-len", "16", "--width", "0.5",
                     "--batch-size", "4", "--steps", "100000", "--eval-every", "100000", "--workers", "1",
                     "--out", str(out))  # fmt: skip
    _training(out)
    os.truncate(cache, 0)
    code, line = _ended(process)
    assert code == 1
    assert line.startswith(f"error: cannot read text cache {cache}: it ends before byte "), line


def _weights_for(tree: Path, path: Path) -> Path:
    zoo.save(zoo.create_model("slim_resnet20", num_classes=2, img_size=16, widths=[0.5, 1.0]), path)
    return path


def test_zoo_eval_on_a_folder_with_a_corrupt_image_is_one_line_and_exits(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": 4, "val": 2})
    (tree / "val" / "a" / "zz_bad.png").write_bytes(b"GIF89a")
    weights = _weights_for(tree, tmp_path / "family.safetensors")
    code, line = _ended(_start("eval", str(weights), "--data", f"folder:{tree}"))
    assert code == 1
    assert line.startswith(f"error: cannot read image {tree / 'val' / 'a' / 'zz_bad.png'}: "), line


def _blocking_image(tree: Path) -> Path:
    """A validation "image" that is a named pipe: its reader blocks, as on a hung mount."""
    fifo = tree / "val" / "b" / "zz_hung.png"
    os.mkfifo(fifo)
    return fifo


def _held_open(fifo: Path, process: subprocess.Popen) -> int:
    """Wait until a worker opened ``fifo`` for reading; keep it blocked in its read (a writer
    that writes nothing); return the writer's descriptor."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            assert err.errno == errno.ENXIO  # no reader yet
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_sigterm_while_a_worker_is_blocked_in_evaluation_exits_and_leaves_no_worker(command, tmp_path):
    """SIGTERM to the whole group, as a scheduler sends it. `zoo train` evaluates only at the
    end (no step to finish: it stops at once, 128 + 15, keeping its checkpoint); `zoo eval` has no
    handler and dies of it, and its blocked worker must die with it."""
    tree = _tree(tmp_path / "tree", {"train": 4, "val": 2})
    fifo = _blocking_image(tree)
    out = tmp_path / "run"
    if command == "train":
        args = ["train", "slim_resnet20", "--data", f"folder:{tree}", *SMALL, "--steps", "2", "--eval-every", "100",
                "--workers", "1", "--out", str(out)]  # fmt: skip
    else:
        args = ["eval", str(_weights_for(tree, tmp_path / "family.safetensors")), "--data", f"folder:{tree}"]
    process = _start(*args)
    writer = _held_open(fifo, process)
    try:
        os.killpg(process.pid, signal.SIGTERM)
        code, line = _ended(process, one_line=command == "train")  # `zoo eval` shows its progress there
    finally:
        os.close(writer)
    if command == "train":
        assert code == 128 + signal.SIGTERM
        assert line == f"stopped at once by SIGTERM; {out / 'checkpoint.pt'} is as it was; continue with --resume"
    else:
        assert code == -signal.SIGTERM
