"""Two real processes (gloo, CPU) train the same family as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import zoo
from training.trainer import TrainConfig, train


@pytest.mark.slow  # ~50 s; DDP through the launcher stays in CI: tests/test_loop.py, two nodes
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """LayerNorm family (no per-process batch statistics), a 2-pass sandwich step (no_sync on
    the first backward), SGD with momentum. The only difference between the runs is the order
    of floating-point sums (per-rank means, then DDP's all-reduce average), a relative error
    near 1e-7 per step; 1e-5 absolute after 3 steps leaves ample margin while any real
    mismatch (a wrong batch split, a missing all-reduce, a doubled gradient) is ~1e-3 or more.
    """
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(Path(zoo.__file__).parent.glob("*.py"))))
    start = tmp_path / "start.safetensors"
    zoo.save(zoo.create_model("slim_gpt_nano", context_length=16, widths=[0.5, 1.0]), start)
    case = dict(model="slim_gpt_nano", data=f"text:{corpus}", strategy="sandwich", widths=[0.5], seq_len=16, steps=3,
                batch_size=8, optimizer="sgd", lr=0.05, eval_every=100, clip_grad=1.0, init=str(start))  # fmt: skip
    single = train(TrainConfig.from_flags(out=str(tmp_path / "single"), **case))

    args = ["train", "slim_gpt_nano", "--data", case["data"], "--strategy", "sandwich", "--width", "0.5",
            "--seq-len", "16", "--steps", "3", "--batch-size", "8", "--optimizer", "sgd", "--lr", "0.05",
            "--eval-every", "100", "--clip-grad", "1.0", "--init", str(start), "--nproc-per-node", "2",
            "--out", str(tmp_path / "ddp")]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote") == 1  # only rank 0 prints and writes

    expected, got = load_file(single.model_path), load_file(tmp_path / "ddp" / "model.safetensors")
    assert expected.keys() == got.keys()
    diff = max((expected[k] - got[k]).abs().max().item() for k in expected)
    initial = load_file(start)
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert diff < 1e-5, diff
    assert moved > 1e-3  # the runs did train
    header = zoo.read_header(tmp_path / "ddp" / "model.safetensors")
    assert header["metadata"]["train"]["world_size"] == 2
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 3]  # final evaluation of the 2 members, once
