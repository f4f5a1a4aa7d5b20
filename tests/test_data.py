"""The data layer on real files in their real formats: digits, stdlib, CIFAR pickles, PNG trees, text.

The streamed folder pipeline, the loader and the text cache have their own file: test_streaming.py.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import STDLIB_MAX_BYTES, _stdlib_source, batches, default_data, load_data
from training.loader import TrainLoader

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


class Python2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the CIFAR archives: protocol 2, every
    string as BINSTRING (a Python 2 str), globals as GLOBAL lines naming numpy.core.multiarray."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = lambda self, obj: self.save_bytes(obj.encode("ascii"))  # numpy's 'u1', '|'

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_python2(obj: object, path: Path) -> None:
    with open(path, "wb") as file:
        Python2Pickler(file, protocol=2).dump(obj)


def random_batch(count: int, seed: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8), rng.integers(0, num_classes, count).tolist()


def write_cifar10(root: Path) -> Path:
    """A CIFAR-10 folder in the archive's exact layout and encoding, 6 images per batch."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = random_batch(6, seed=i, num_classes=10)
        dump_python2(
            {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * 6}, root / name
        )
    dump_python2({b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": 6, b"num_vis": 3072}, root / "batches.meta")
    return root


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar-10-batches-py"))


def write_cifar100(root: Path) -> None:
    """CIFAR-100 written with plain pickle.dump at three protocols (4, 5 and 2)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, count, seed, protocol in (("train", 8, 10, pickle.DEFAULT_PROTOCOL), ("test", 4, 11, 5)):
        data, fine = random_batch(count, seed, num_classes=100)
        with open(root / name, "wb") as file:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * count}, file, protocol=protocol)
    with open(root / "meta", "wb") as file:
        pickle.dump(
            {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20},
            file,
            protocol=2,
        )


def write_png(path: Path, color: tuple[int, ...] | int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


CLASS_COLORS = {"apple": (200, 30, 40), "kiwi": (60, 180, 20), "plum": (90, 20, 140)}


def write_class_tree(root: Path, per_class: int) -> None:
    """Solid-colour PNGs, one colour per class, so every decoded pixel is predictable."""
    for name, color in CLASS_COLORS.items():
        for k in range(per_class):
            write_png(root / name / f"{k:02d}.png", color)
    (root / "apple" / "notes.txt").write_text("not an image, ignored")


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------


def test_digits_shapes_labels_normalisation_and_split():
    from sklearn.datasets import load_digits

    bundle = load_data("digits", val_fraction=0.2, seed=3)
    assert (bundle.kind, bundle.num_classes, bundle.input_size, bundle.seq_len) == ("image", 10, (1, 8, 8), None)
    assert bundle.labels == [str(d) for d in range(10)] and (bundle.mean, bundle.std) == ((0.5,), (0.5,))
    assert len(bundle.train) + len(bundle.val) == 1797 and abs(len(bundle.val) - 0.2 * 1797) < 10
    assert set(bundle.val.targets.tolist()) == set(range(10))  # every class held out
    image, label = bundle.val[0]
    assert image.dtype == torch.float32 and label.dtype == torch.int64 and image.shape == (1, 8, 8)
    # undoing the normalisation gives back exactly the 0..16 pixels of the originals, all of them
    originals = sorted(tuple(row) + (int(t),) for row, t in zip(load_digits().data.astype(int), load_digits().target))
    items = [ds[i] for ds in (bundle.train, bundle.val) for i in range(len(ds))]
    recovered = [tuple(((x * 0.5 + 0.5) * 16).round().int().flatten().tolist()) + (int(y),) for x, y in items]
    assert sorted(recovered) == originals
    again, other = load_data("digits", val_fraction=0.2, seed=3), load_data("digits", val_fraction=0.2, seed=4)
    assert torch.equal(again.val.images, bundle.val.images) and torch.equal(again.val.targets, bundle.val.targets)
    assert not torch.equal(other.val.images, bundle.val.images)
    before = bundle.train[5][0]
    bundle.train.set_epoch(3)
    assert torch.equal(bundle.train[5][0], before)  # digits are never augmented
    assert load_data("digits", img_size=16).input_size == (1, 16, 16)


def test_stdlib_windows_are_shifted_bytes_and_val_is_a_disjoint_tail():
    bundle = load_data("stdlib", seq_len=64, val_fraction=0.1)
    corpus = _stdlib_source()
    assert (bundle.kind, bundle.num_classes, bundle.seq_len, bundle.input_size) == ("tokens", 256, 64, None)
    assert 1_000_000 < len(corpus) <= STDLIB_MAX_BYTES
    train, val = bundle.train, bundle.val
    # the two regions tile the corpus: train is a prefix, val the remaining tail
    assert bytes(train.data.tolist()) + bytes(val.data.tolist()) == corpus
    assert abs(len(val.data) - 0.1 * len(corpus)) <= 1
    for dataset, index in ((train, 0), (train, 1), (train, len(train) - 1), (val, len(val) - 1)):
        x, y = dataset[index]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (64,)
        assert torch.equal(x[1:], y[:-1])
        start = index * 64
        assert bytes(x.tolist()) + bytes(y[-1:].tolist()) == bytes(dataset.data[start : start + 65].tolist())
    assert len(val) == (len(val.data) - 1) // 64  # non-overlapping windows
    with pytest.raises(IndexError):
        val[len(val)]


def test_cifar10_in_the_archive_format(cifar10_dir):
    bundle = load_data(f"cifar10:{cifar10_dir}")
    assert (bundle.num_classes, bundle.input_size, len(bundle.train), len(bundle.val)) == (10, (3, 32, 32), 30, 6)
    assert bundle.labels == [n.decode() for n in CIFAR10_NAMES]
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2470, 0.2435, 0.2616)
    data, labels = random_batch(6, seed=5, num_classes=10)  # what test_batch holds
    assert (
        torch.equal(bundle.val.images, torch.from_numpy(data).view(6, 3, 32, 32))
        and bundle.val.targets.tolist() == labels
    )
    data1, labels1 = random_batch(6, seed=0, num_classes=10)
    assert (
        torch.equal(bundle.train.images[:6], torch.from_numpy(data1).view(6, 3, 32, 32))
        and bundle.train.targets[:6].tolist() == labels1
    )
    x, y = bundle.val[2]
    mean, std = torch.tensor(bundle.mean).view(3, 1, 1), torch.tensor(bundle.std).view(3, 1, 1)
    assert (
        torch.allclose(x, (torch.from_numpy(data[2]).view(3, 32, 32).float() / 255 - mean) / std)
        and y.item() == labels[2]
    )


def test_cifar10_from_the_folder_holding_the_archive(tmp_path, cifar10_dir):
    (tmp_path / "cifar-10-batches-py").symlink_to(cifar10_dir)
    bundle = load_data(f"cifar10:{tmp_path}", img_size=16)
    assert bundle.input_size == (3, 16, 16) and len(bundle.val) == 6


def test_cifar100_written_with_pickle_dump(tmp_path):
    write_cifar100(tmp_path)
    bundle = load_data(f"cifar100:{tmp_path}")
    assert (bundle.num_classes, len(bundle.train), len(bundle.val)) == (100, 8, 4)
    assert bundle.labels[:2] == ["class0", "class1"] and bundle.mean == (0.5071, 0.4865, 0.4409)
    data, fine = random_batch(4, seed=11, num_classes=100)
    assert (
        torch.equal(bundle.val.images, torch.from_numpy(data).view(4, 3, 32, 32))
        and bundle.val.targets.tolist() == fine
    )


def test_corrupt_and_malicious_batches_are_refused_and_nothing_runs(tmp_path, cifar10_dir):
    marker = tmp_path / "pwned"

    class RunsACommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for name, payload, fragment in (
        ("truncated", (cifar10_dir / "data_batch_1").read_bytes()[:5000], "truncated"),
        ("garbage", b"this is not a pickle at all", "corrupt"),
        ("os.system", pickle.dumps({b"data": RunsACommand(), b"labels": []}), "refused to load: it names posix.system"),
        ("os.system at protocol 0", pickle.dumps(RunsACommand(), protocol=0), "refused to load: it names posix.system"),
        ("object array", pickle.dumps({b"data": np.array([RunsACommand()], dtype=object), b"labels": [0]}), "refused"),
    ):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        for file in cifar10_dir.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        (folder / "data_batch_3").write_bytes(payload)
        with pytest.raises(ValueError) as excinfo:
            load_data(f"cifar10:{folder}")
        message = one_line_error(excinfo)
        assert "data_batch_3" in message and fragment in message, message
        assert not marker.exists()


def test_wrong_batch_contents_are_refused(tmp_path, cifar10_dir):
    for file in cifar10_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    data, labels = random_batch(6, seed=0, num_classes=10)
    for bad in (
        {b"data": data[:, :100], b"labels": labels},
        {b"data": data, b"labels": labels[:5]},
        {b"data": data, b"labels": [10] * 6},
        [1, 2, 3],
    ):
        dump_python2(bad, tmp_path / "test_batch")
        with pytest.raises(ValueError) as excinfo:
            load_data(f"cifar10:{tmp_path}")
        assert "test_batch" in one_line_error(excinfo)


def test_folder_of_pngs_split_per_class(tmp_path):
    write_class_tree(tmp_path, per_class=5)
    write_png(tmp_path / ".hidden" / "x.png", (0, 0, 0))
    bundle = load_data(f"folder:{tmp_path}", val_fraction=0.2, img_size=8)
    assert bundle.labels == ["apple", "kiwi", "plum"] and bundle.input_size == (3, 8, 8) and bundle.crop_pct == 0.875
    assert (len(bundle.train), len(bundle.val)) == (12, 3) and sorted(bundle.val.targets.tolist()) == [0, 1, 2]
    colors = torch.tensor([CLASS_COLORS[bundle.labels[t]] for t in bundle.train.targets], dtype=torch.float64) / 255
    assert bundle.mean == tuple(round(m, 4) for m in colors.mean(0).tolist())
    assert bundle.std == tuple(round(s, 4) for s in colors.std(0, unbiased=False).tolist())
    mean, std = torch.tensor(bundle.mean).view(3, 1, 1), torch.tensor(bundle.std).view(3, 1, 1)
    for i in range(len(bundle.val)):  # resize and centre crop of a solid colour: the colour, normalised
        image, target = bundle.val[i]
        color = torch.tensor(CLASS_COLORS[bundle.labels[target]]).view(3, 1, 1) / 255
        assert image.shape == (3, 8, 8) and torch.allclose(image, ((color - mean) / std).expand(3, 8, 8), atol=1e-5)
    assert all(bundle.train[i][0].shape == (3, 8, 8) for i in range(len(bundle.train)))


def test_folder_with_train_and_val_and_grayscale(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for name, shade in (("dark", 30), ("light", 220)):
            for k in range(count):
                write_png(tmp_path / split / name / f"{k}.png", shade, size=(20, 40), mode="L")
    bundle = load_data(f"folder:{tmp_path}")
    assert bundle.labels == ["dark", "light"] and bundle.input_size == (
        1,
        224,
        224,
    )  # files of any size: 224 unless told
    assert (len(bundle.train), len(bundle.val)) == (6, 4) and bundle.val.targets.tolist() == [0, 0, 1, 1]
    assert bundle.mean == (round(125 / 255, 4),) and bundle.std == (round(95 / 255, 4),)
    assert torch.allclose(
        bundle.val[3][0], torch.full((1, 224, 224), (220 / 255 - bundle.mean[0]) / bundle.std[0]), atol=1e-5
    )


def test_text_file_and_text_folder(tmp_path):
    corpus = bytes(range(32, 96)) * 16  # 1024 printable bytes
    (tmp_path / "one.txt").write_bytes(corpus)
    bundle = load_data(f"text:{tmp_path / 'one.txt'}", seq_len=16, val_fraction=0.25)
    train, val = bundle.train, bundle.val
    assert (train.size, val.size, len(train), len(val)) == (768, 256, 47, 15)
    assert bytes(train.read(0, 768).tolist()) + bytes(val.read(0, 256).tolist()) == corpus
    x, y = train[10]
    assert x.tolist() == list(corpus[160:176]) and y.tolist() == list(corpus[161:177])

    folder = tmp_path / "tree"
    files = {"b.md": b"# heading\n" * 20, "a.txt": b"alpha " * 30, "sub/c.py": b"print('c')\n" * 20}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    (folder / "image.bin").write_bytes(b"\x89PNG\0\0binary")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_bytes(b"hidden " * 50)
    bundle = load_data(f"text:{folder}", seq_len=32, val_fraction=0.2)
    expected = files["a.txt"] + files["b.md"] + files["sub/c.py"]
    assert (
        bytes(bundle.train.read(0, bundle.train.size).tolist()) + bytes(bundle.val.read(0, bundle.val.size).tolist())
        == expected
    )


def test_augmentation_depends_only_on_seed_epoch_and_index(cifar10_dir):
    bundle, twin = load_data(f"cifar10:{cifar10_dir}", seed=7), load_data(f"cifar10:{cifar10_dir}", seed=7)
    train = bundle.train

    def epoch_items(dataset, epoch, order):
        dataset.set_epoch(epoch)
        return {i: dataset[i][0] for i in order}

    first = epoch_items(train, 0, range(30))
    assert all(torch.equal(first[i], item) for i, item in epoch_items(twin.train, 0, reversed(range(30))).items())
    second = epoch_items(train, 1, range(30))
    assert sum(not torch.equal(first[i], second[i]) for i in range(30)) >= 25
    mean, std = torch.tensor(bundle.mean).view(3, 1, 1), torch.tensor(bundle.std).view(3, 1, 1)
    for i in range(5):  # each augmented item is a 4-pixel padded crop, maybe flipped, of the original
        padded = torch.nn.functional.pad(train.images[i], (4, 4, 4, 4))
        candidates = [
            c for top in range(9) for left in range(9) for c in (padded[:, top : top + 32, left : left + 32],)
        ]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.allclose(second[i], (c.float() / 255 - mean) / std) for c in candidates)
    other_seed = load_data(f"cifar10:{cifar10_dir}", seed=8).train
    assert sum(not torch.equal(first[i], other_seed[i][0]) for i in range(30)) >= 25
    bundle.val.set_epoch(0)
    unaugmented = (bundle.val.images[0].float() / 255 - mean) / std  # validation items are never augmented
    twin.val.set_epoch(3)
    assert torch.allclose(bundle.val[0][0], unaugmented) and torch.equal(bundle.val[0][0], twin.val[0][0])


def test_train_loader_and_batches_are_deterministic(cifar10_dir):
    bundle = load_data(f"cifar10:{cifar10_dir}", seed=1)
    loader = TrainLoader(bundle, 4, seed=1)
    a, b, c = list(loader.epoch(2)), list(loader.epoch(2)), list(loader.epoch(3))
    assert len(a) == 7 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, c))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a[3:], loader.epoch(2, start=3)))  # resumed mid-epoch
    whole = list(TrainLoader(bundle, 10, seed=1).epoch(0))  # two processes' shares interleave to one process's batch
    shares = [list(TrainLoader(bundle, 10, seed=1, rank=r, world_size=2).epoch(0)) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shares):
        assert torch.equal(torch.stack([x0, x1], 1).flatten(0, 1), x) and torch.equal(
            torch.stack([y0, y1], 1).flatten(), y
        )

    val = load_data("digits").val
    chunks = list(batches(val, 50, limit=2))
    assert [c.shape for c in chunks] == [(50, 1, 8, 8)] * 2
    assert torch.equal(torch.cat(chunks), torch.stack([val[i][0] for i in range(100)]))
    assert sum(len(c) for c in batches(val, 64)) == len(val)


def test_default_data():
    assert (default_data("image"), default_data("tokens")) == ("digits", "stdlib")
    with pytest.raises(ValueError):
        default_data("audio")


def _error_cases(tmp_path: Path) -> list[tuple[str, dict, type, str]]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "readme.txt").write_text("hello")
    write_png(tmp_path / "one_empty" / "cat" / "a.png", (1, 2, 3))
    (tmp_path / "one_empty" / "dog").mkdir()
    write_png(tmp_path / "bad_png" / "cat" / "a.png", (1, 2, 3))
    (tmp_path / "bad_png" / "cat" / "b.png").write_bytes(b"not a png")
    write_png(tmp_path / "truncated_png" / "cat" / "a.png", (1, 2, 3), size=(64, 64))
    write_png(tmp_path / "truncated_png" / "cat" / "b.png", (1, 2, 3))
    full = (tmp_path / "truncated_png" / "cat" / "a.png").read_bytes()
    (tmp_path / "truncated_png" / "cat" / "a.png").write_bytes(full[: len(full) // 2])
    write_png(tmp_path / "only_train" / "train" / "cat" / "a.png", (1, 2, 3))
    write_png(tmp_path / "split" / "train" / "cat" / "a.png", (1, 2, 3))
    write_png(tmp_path / "split" / "val" / "dog" / "a.png", (1, 2, 3))
    write_png(tmp_path / "singletons" / "cat" / "a.png", (1, 2, 3))
    (tmp_path / "short.txt").write_bytes(b"x" * 300)
    (tmp_path / "binary.dat").write_bytes(b"ab\0cd" * 200)
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "blob").write_bytes(b"\0" * 1000)
    return [
        ("mnist", {}, ValueError, "known: digits, stdlib"),
        ("digits:/tmp", {}, ValueError, "takes no path"),
        ("cifar10:", {}, ValueError, "needs a path"),
        (f"folder:{tmp_path / 'missing'}", {}, FileNotFoundError, "not found"),
        (f"cifar10:{tmp_path / 'empty'}", {}, FileNotFoundError, "batches.meta"),
        (f"cifar100:{tmp_path / 'short.txt'}", {}, ValueError, "is a file"),
        (f"folder:{tmp_path / 'empty'}", {}, ValueError, "no class folders"),
        (f"folder:{tmp_path / 'no_images'}", {}, ValueError, "no images"),
        (f"folder:{tmp_path / 'one_empty'}", {}, ValueError, "without images"),
        (f"folder:{tmp_path / 'bad_png'}", {}, ValueError, "b.png"),
        (f"folder:{tmp_path / 'truncated_png'}", {}, ValueError, "a.png"),
        (f"folder:{tmp_path / 'only_train'}", {}, ValueError, "train/ and val/"),
        (f"folder:{tmp_path / 'split'}", {}, ValueError, "dog"),
        (f"folder:{tmp_path / 'singletons'}", {}, ValueError, "single image"),
        (f"text:{tmp_path / 'short.txt'}", {"seq_len": 256}, ValueError, "300 bytes"),
        (f"text:{tmp_path / 'binary.dat'}", {}, ValueError, "not a text file"),
        (f"text:{tmp_path / 'no_text'}", {}, ValueError, "no text"),
        ("digits", {"val_fraction": 0.0}, ValueError, "val_fraction"),
        ("digits", {"val_fraction": 1.0}, ValueError, "val_fraction"),
        ("stdlib", {"seq_len": 0}, ValueError, "seq_len"),
        ("digits", {"img_size": 0}, ValueError, "img_size"),
    ]


def test_every_error_is_one_line(tmp_path):
    """At loading, or for a bad image not among the sampled ones, the first time it is read."""
    for spec, kwargs, error, fragment in _error_cases(tmp_path):
        with pytest.raises(error) as excinfo:
            bundle = load_data(spec, **kwargs)
            for dataset in (bundle.train, bundle.val):
                [dataset[i] for i in range(len(dataset))]
        assert fragment in one_line_error(excinfo), (spec, str(excinfo.value))
