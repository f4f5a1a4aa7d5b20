"""benchmarks/peers.py's own logic, without the peers: the hard digits in CIFAR's real format,
resuming from per-seed records, and the table computed from the records alone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import peers  # noqa: E402
from peers_data import render, write_cifar_folder  # noqa: E402

from training.data import load_data  # noqa: E402


def run_record(model: str, method: str, seed: int, accuracy: dict, *, latency: float = 1.0) -> dict:
    """A finished record as ``peers.measure`` writes it: per target rows and the method's cost."""
    labels = ["zoo-uniform", "zoo-search"] if method == "zoo" else [method]
    rows = [
        dict(method=label, target=t, accuracy=accuracy[label][i], params=1000 * (i + 1), flops=10**6 * (i + 1),
             latency_ms=latency * (i + 1), onnx=f"{label}_{t}.onnx")
        for label in labels
        for i, t in enumerate((0.25, 0.5, 0.75))
    ]  # fmt: skip
    cost = {label: dict(steps=300, passes=1200 if method == "zoo" else 900, seconds=60.0 + seed) for label in labels}
    return dict(model=model, method=method, seed=seed, steps=300, rows=rows, cost=cost, full_latency_ms=5.0)


def test_hard_digits_are_cifar_batches_zoo_reads(tmp_path):
    digits = np.random.default_rng(0).integers(0, 256, (10, 784)).astype(np.uint8)
    images = render(digits, seed=1)
    assert images.shape == (10, 3072) and images.dtype == np.uint8
    assert np.array_equal(images, render(digits, seed=1)) and not np.array_equal(images, render(digits, seed=2))
    labels = np.arange(10)
    write_cifar_folder(tmp_path, (images, labels), (images[:4], labels[:4]))
    bundle = load_data(f"cifar10:{tmp_path}")
    assert (len(bundle.train), len(bundle.val), bundle.input_size) == (10, 4, (3, 32, 32))
    assert [int(bundle.val[i][1]) for i in range(4)] == [0, 1, 2, 3]


def test_table_is_computed_from_the_records_per_seed(tmp_path):
    accuracy = {"tp-taylor": [0.5, 0.6, 0.7]}
    for seed, shift in ((0, 0.0), (1, 0.1)):
        shifted = {k: [a + shift for a in v] for k, v in accuracy.items()}
        peers.write_json(peers.record_path(tmp_path, "resnet20", "tp-taylor", seed), run_record(
            "resnet20", "tp-taylor", seed, shifted, latency=1.0 + seed))  # fmt: skip
    zoo_accuracy = {"zoo-uniform": [0.4, 0.5, 0.6], "zoo-search": [0.45, 0.55, 0.65]}
    peers.write_json(peers.record_path(tmp_path, "resnet20", "zoo", 0), run_record("resnet20", "zoo", 0, zoo_accuracy))
    failed = dict(model="resnet20", method="modelopt", seed=0, error="RuntimeError: no", where="x", versions={"a": "1"})
    peers.write_json(peers.record_path(tmp_path, "resnet20", "modelopt", 0), failed)
    tables = peers.summarize(peers.read_records(tmp_path))
    rows = {(r["method"], r["target"]): r for r in tables["resnet20"]}
    assert set(rows) == {(m, t) for m in ("zoo-uniform", "zoo-search", "tp-taylor") for t in (0.25, 0.5, 0.75)}
    taylor = rows[("tp-taylor", 0.5)]
    assert taylor["seeds"] == [0, 1]
    assert taylor["accuracy"] == pytest.approx(0.65) and taylor["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert taylor["latency_ms"] == pytest.approx(3.0) and taylor["seconds"] == pytest.approx(60.5)
    assert (
        rows[("zoo-search", 0.75)]["accuracy"] == pytest.approx(0.65) and rows[("zoo-uniform", 0.25)]["passes"] == 1200
    )
    peers.write_report(tmp_path)
    report = (tmp_path / "peers.md").read_text()
    assert "| 0.5 | tp-taylor | 0,1 | 65.0 ± 7.1 |" in report
    assert "| resnet20 | 0.5 | 50.0 ± 0.0 (2.00 ms) | 55.0 ± 0.0 (2.00 ms) | – | 65.0 ± 7.1 (3.00 ms) | – |" in report
    assert "| resnet20 | tp-taylor | 0,1 | 300 / 900 | 60 |" in report
    assert "resnet20 modelopt seed 0 (a 1): `RuntimeError: no`" in report
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_record_is_not_run_again_and_a_failed_one_only_with_retry(tmp_path, monkeypatch):
    done = run_record("resnet18", "tp-magnitude", 2, {"tp-magnitude": [0.1, 0.2, 0.3]})
    peers.write_json(peers.record_path(tmp_path, "resnet18", "tp-magnitude", 2), done)
    failed = dict(model="resnet18", method="modelopt", seed=2, error="ValueError: x", where="", versions={})
    peers.write_json(peers.record_path(tmp_path, "resnet18", "modelopt", 2), failed)
    ran = []
    monkeypatch.setattr(peers, "train_start", lambda *a: ran.append(a) or {"onnx": "start.onnx"})
    monkeypatch.setattr(peers, "run_method", lambda method, *a: ran.append(method) or {"rows": [], "cost": {}})
    monkeypatch.setattr(peers, "latency", lambda files: {"full": 2.0})
    args = argparse.Namespace(out=tmp_path, work=tmp_path / "work", steps=300, start_steps=10, retry=False)
    assert peers.measure("resnet18", "tp-magnitude", 2, args, ("a", "b")) == done
    assert peers.measure("resnet18", "modelopt", 2, args, ("a", "b"))["error"] == "ValueError: x"
    assert ran == []
    args.retry = True
    assert peers.measure("resnet18", "tp-magnitude", 2, args, ("a", "b")) == done
    redone = peers.measure("resnet18", "modelopt", 2, args, ("a", "b"))
    assert "modelopt" in ran and "error" not in redone and redone["full_latency_ms"] == 2.0
    assert json.loads(peers.record_path(tmp_path, "resnet18", "modelopt", 2).read_text()) == redone


def test_a_lost_starting_model_is_retrained_and_must_match_its_record(tmp_path, monkeypatch):
    import peers_data
    import torch

    trained, accuracy = [], [0.5]
    layers = (torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 10))
    monkeypatch.setattr(peers_data, "start_model", lambda name: torch.nn.Sequential(*layers))
    monkeypatch.setattr(peers_data, "train_plain", lambda *a, **k: trained.append(a) or 7.0)
    monkeypatch.setattr(peers_data, "export_plain", lambda model, path: path.write_bytes(b"onnx") and path)
    monkeypatch.setattr(peers_data, "onnx_accuracy", lambda path, spec: accuracy[0])
    work, out = tmp_path / "work", tmp_path / "out"
    first = peers.train_start("resnet20", "spec", work, out, 10)
    written = peers.record_path(out, "resnet20", "start", 0).read_text()
    assert first["accuracy"] == 0.5 and first["seconds"] == 7.0 and len(trained) == 1
    assert peers.train_start("resnet20", "spec", work, out, 10) == first and len(trained) == 1
    (work / "resnet20" / "start.safetensors").unlink()
    assert peers.train_start("resnet20", "spec", work, out, 10) == first and len(trained) == 2
    assert (work / "resnet20" / "start.safetensors").exists()
    assert peers.record_path(out, "resnet20", "start", 0).read_text() == written
    (work / "resnet20" / "start.onnx").unlink()
    accuracy[0] = 0.6
    with pytest.raises(RuntimeError, match=r"retrained differs from its record: \{'accuracy': \(0.5, 0.6\)\}"):
        peers.train_start("resnet20", "spec", work / "elsewhere", out, 10)
