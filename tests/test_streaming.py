"""Data at scale: a folder streamed through timm's transforms, the training loader (workers,
mixup, shares of processes), corrupt images named, the text cache built once and atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
from cli.app import app
from training import image_folder, text_cache
from training.data import load_data
from training.loader import TrainLoader

AUGMENTED = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.5)


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> Path:
    """Two classes of 10 random-noise JPEGs and PNGs of assorted sizes (so every crop differs)."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, (rng.integers(12, 24), rng.integers(12, 24), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_folder_items_depend_only_on_seed_epoch_and_index(noise_folder):
    bundle, twin = (load_data(f"folder:{noise_folder}", seed=3, img_size=8, **AUGMENTED) for _ in range(2))
    train, count = bundle.train, len(bundle.train)
    assert (count, len(bundle.val), bundle.streamed) == (18, 2, True)

    def items(dataset, epoch, order):
        dataset.set_epoch(epoch)
        return {i: dataset[i][0] for i in order}

    torch.manual_seed(123)  # the global generators neither decide an item nor are moved by one
    first = items(train, 0, range(count))
    after = torch.rand(1)
    assert all(torch.equal(first[i], x) for i, x in items(twin.train, 0, reversed(range(count))).items())
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)
    second = items(train, 1, range(count))
    assert sum(not torch.equal(first[i], second[i]) for i in range(count)) == count
    other_seed = load_data(f"folder:{noise_folder}", seed=4, img_size=8, **AUGMENTED).train
    assert sum(not torch.equal(first[i], other_seed[i][0]) for i in range(count)) >= count - 1  # a different split too
    assert all(torch.equal(bundle.val[i][0], twin.val[i][0]) for i in range(2))


def test_batches_are_the_same_with_0_and_2_workers_and_mixup_mixes_them(noise_folder):
    bundle = load_data(f"folder:{noise_folder}", seed=1, img_size=8, **AUGMENTED)
    runs = {
        w: [list(TrainLoader(bundle, 6, seed=1, workers=w, mixup=0.8, cutmix=1.0).epoch(e, start=1)) for e in (0, 1)]
        for w in (0, 2)
    }
    for (x0, y0), (x2, y2) in zip(sum(runs[0], []), sum(runs[2], [])):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert len(runs[0][0]) == 2 and all(y.shape == (6, 2) and torch.allclose(y.sum(1), torch.ones(6)) for y in (y0, y2))

    plain = list(TrainLoader(bundle, 6, seed=1).epoch(0))  # the same items, unmixed
    mixed = list(TrainLoader(bundle, 6, seed=1, mixup=1.0).epoch(0))
    for (x, labels), (mix, soft) in zip(plain, mixed):  # timm's batch mixup: x * lam + x.flip(0) * (1 - lam)
        lam = float(soft[torch.arange(6), labels].min())
        assert 0 < lam < 1 and torch.allclose(mix, x * lam + x.flip(0) * (1 - lam), atol=1e-5)
        assert torch.allclose(
            soft,
            torch.nn.functional.one_hot(labels, 2) * lam + torch.nn.functional.one_hot(labels.flip(0), 2) * (1 - lam),
        )


def test_a_corrupt_image_is_named_when_a_worker_first_reads_it(tmp_path, monkeypatch):
    for label in ("a", "b"):
        for i in range(8):
            (tmp_path / "tree" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 10), (40 * i, 90, 200)).save(tmp_path / "tree" / label / f"{i}.png")
    (tmp_path / "tree" / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is missing")
    monkeypatch.setattr(image_folder, "STATS_SAMPLE", 2)  # the scan decodes only the first and last training image
    args = [
        "--data",
        f"folder:{tmp_path / 'tree'}",
        "--img-size",
        "8",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "2",
    ]
    result = CliRunner().invoke(app, ["train", "slim_resnet20", *args, "--out", str(tmp_path / "run")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: cannot read image {tmp_path / 'tree' / 'b' / '3.png'}: ")


def _cache_files() -> list[Path]:
    return sorted(text_cache.cache_folder().glob("*.u8"))


def test_text_cache_is_built_once_reused_rebuilt_on_change_and_never_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "a.txt").write_bytes(b"alpha beta gamma\n" * 200)
    (source / "b.txt").write_bytes(b"delta epsilon\n" * 200)
    bundle = load_data(f"text:{source}", seq_len=32)
    [cache] = _cache_files()
    assert cache.read_bytes() == (source / "a.txt").read_bytes() + (source / "b.txt").read_bytes()
    built = cache.stat()

    again = load_data(f"text:{source}", seq_len=32)  # reused: the same file, not written again
    assert _cache_files() == [cache] and (cache.stat().st_ino, cache.stat().st_mtime_ns) == (
        built.st_ino,
        built.st_mtime_ns,
    )
    assert all(torch.equal(bundle.train[i][0], again.train[i][0]) for i in (0, 50, len(bundle.train) - 1))

    (source / "b.txt").write_bytes(b"DELTA EPSILON\n" * 200)  # same size, new content and time
    os.utime(source / "b.txt", ns=(built.st_mtime_ns + 10**9,) * 2)
    changed = load_data(f"text:{source}", seq_len=32)
    [rebuilt] = _cache_files()  # the stale cache is gone
    assert rebuilt != cache and rebuilt.read_bytes().endswith(b"DELTA EPSILON\n")
    assert bytes(changed.val.read(changed.val.size - 14, 14).tolist()) == b"DELTA EPSILON\n"
    assert (
        bytes(again.val.read(again.val.size - 14, 14).tolist()) == b"delta epsilon\n"
    )  # a loaded corpus keeps its file

    (source / "c.txt").write_bytes(b"zeta\n" * 5000)
    real_copy = text_cache._copy_text

    def failing_copy(path, out):  # the third file fails halfway: the disk read errors
        if path.name == "c.txt":
            out.write(b"zeta\n" * 100)
            raise OSError(5, "Input/output error")
        return real_copy(path, out)

    monkeypatch.setattr(text_cache, "_copy_text", failing_copy)
    with pytest.raises(ValueError, match=f"^cannot read {source / 'c.txt'}: Input/output error$"):
        load_data(f"text:{source}", seq_len=32)
    assert _cache_files() == [rebuilt] and not [p for p in text_cache.cache_folder().iterdir() if p.suffix != ".u8"]
    monkeypatch.setattr(text_cache, "_copy_text", real_copy)
    load_data(f"text:{source}", seq_len=32)
    assert [p.read_bytes()[-5:] for p in _cache_files()] == [b"zeta\n"]


def test_a_large_corpus_holds_out_at_most_a_mebibyte(tmp_path):
    (tmp_path / "big.txt").write_bytes(b"0123456789abcdef" * (2**20 // 8))  # 2 MiB
    bundle = load_data(f"text:{tmp_path / 'big.txt'}", seq_len=64, val_fraction=0.75)
    assert (bundle.train.size, bundle.val.size) == (2**20, 2**20)


def test_timm_auto_augment_posterize_to_zero_bits_runs_on_this_pillow():
    """RandAugment at magnitude 10 (``inc1``) posterizes to 0 bits, which Pillow >= 12 refuses."""
    train, _ = image_folder._transforms(3, 16, (0.5,) * 3, (0.5,) * 3, image_folder.Augmentation("rand-n1-m10-inc1"))
    image = Image.new("RGB", (20, 20), (200, 100, 50))
    outputs = []
    for seed in range(60):
        with image_folder.seeded(seed):
            outputs.append(train(image))
    assert all(x.shape == (3, 16, 16) for x in outputs)


def test_an_export_of_a_folder_model_preprocesses_as_its_evaluation(noise_folder):
    """The weights file records crop_pct; the export's record carries it and the runtime's
    resize and centre crop give what the validation transform gave (up to Pillow's rounding to uint8)."""
    import zoo
    from export.onnx_export import input_record
    from export.runtime import fit

    bundle = load_data(f"folder:{noise_folder}", img_size=12, crop_pct=0.75)
    metadata = {"train": {"mean": list(bundle.mean), "std": list(bundle.std), "crop_pct": bundle.crop_pct}}
    record = input_record(zoo.create_model("slim_resnet20", num_classes=2, img_size=12), metadata)
    assert record == {
        "kind": "image",
        "shape": [3, 12, 12],
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "crop_pct": 0.75,
    }
    mean, std = np.asarray(record["mean"], dtype=np.float32), np.asarray(record["std"], dtype=np.float32)
    for i in range(len(bundle.val)):
        pixels = np.asarray(Image.open(bundle.val.files.path(i)).convert("RGB"), dtype=np.float32) / 255
        assert pixels.shape[0] != pixels.shape[1]  # not square: the crop matters
        expected = bundle.val[i][0].permute(1, 2, 0).numpy()
        assert np.abs((fit(pixels, 12, 12, record["crop_pct"]) - mean) / std - expected).max() < 1.5 / 255 / std.min()


@pytest.mark.slow  # three 2-process runs, about a minute; CI: the loader test above, tests/test_two_processes.py
def test_two_processes_with_workers_resume_bit_identical(noise_folder, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["train", "slim_resnet20", "--data", f"folder:{noise_folder}", "--img-size", "8", "--width", "0.5",
            "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--aa", "rand-m9-mstd0.5-inc1",
            "--reprob", "0.5", "--mixup", "0.8", "--cutmix", "1.0", "--workers", "1",
            "--nproc-per-node", "2"]  # fmt: skip

    def run(out: str, *extra: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args, "--out", str(tmp_path / out), *extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr

    run("whole")
    run("parts", "--stop-after", "4")  # epoch 0 has 4 steps: the resumed part is epoch 1
    run("parts", "--resume", "--workers", "2")
    expected, got = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "parts" / "model.safetensors"),
    )
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
