"""``folder:PATH``: an image tree streamed from disk through timm's transforms.

The scan lists files and labels only (held compactly: one byte buffer of relative paths, so a
million-image tree costs tens of megabytes and forked loader workers do not copy it); each image
is decoded when its item is read, in DataLoader workers. Training items go through timm's
training transform (``RandomResizedCrop``, horizontal flip, colour jitter, optional
RandAugment/AutoAugment ``--aa`` and random erasing ``--reprob``), validation items through its
evaluation transform (resize to ``img_size / crop_pct``, centre crop).

Reproducibility contract (as for the in-memory datasets): item ``i`` of epoch ``e`` depends only
on ``(seed, e, i)``. timm's transforms draw from Python's, numpy's and torch's global
generators; every item runs them under :func:`seeded` with its own seed (and, in the main
process, the generators are put back afterwards), so the result is the same in the main process
or any worker, and the training process's own random streams are not moved.

Normalisation is the tree's own per-channel mean and standard deviation, estimated on an evenly
spaced sample of at most ``STATS_SAMPLE`` training images (deterministic for a given tree); the
same sample decides grayscale (every sampled image grayscale) or RGB. A corrupt image is named
in one line: at the scan if it is in the sample, else the first time it is read.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from .bundle import IMAGE_EXTENSIONS, DataBundle, DataError, check_index, item_seed, one_line, stratified_split

STATS_SAMPLE = 256  # training images decoded at the scan for the mean, std and colour mode
DEFAULT_CROP_PCT = 0.875  # timm's: evaluation resizes to img_size / 0.875, then centre-crops
INTERPOLATION = "bilinear"
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # what Pillow raises for a bad file


class UnreadableImage(DataError):
    """An image file that cannot be decoded (one line naming it, from a worker too)."""


@dataclass(frozen=True)
class Augmentation:
    """The training transform's options (timm's names in brackets)."""

    auto_augment: str | None = None  # --aa, e.g. "rand-m9-mstd0.5-inc1" [auto_augment]
    reprob: float = 0.0  # --reprob: random erasing probability, pixel mode [re_prob]
    crop_pct: float | None = None  # evaluation crop; default DEFAULT_CROP_PCT [crop_pct]

    @property
    def eval_crop_pct(self) -> float:
        return self.crop_pct or DEFAULT_CROP_PCT


def check_augmentation(augmentation: Augmentation) -> None:
    """Refuse options timm's transforms would not accept, in one line and before any data."""
    if not 0.0 <= augmentation.reprob <= 1.0:
        raise ValueError(f"--reprob must be in [0, 1], got {augmentation.reprob}")
    if augmentation.crop_pct is not None and not 0.0 < augmentation.crop_pct <= 1.0:
        raise ValueError(f"--crop-pct must be in (0, 1], got {augmentation.crop_pct}")
    if augmentation.auto_augment is not None:
        try:
            _transforms(3, 32, (0.5,) * 3, (0.5,) * 3, augmentation)
        except Exception as err:  # timm asserts on unknown policies and raises on bad numbers
            example = "rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2 or trivial"
            raise ValueError(
                f"--aa {augmentation.auto_augment!r} is not a timm auto-augment policy "
                f"({one_line(err) or 'unknown'}); e.g. {example}"
            ) from None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU generator seeded with ``seed`` for the block (timm's
    transforms and ``Mixup`` draw from all three), then put back as they were. In a DataLoader
    worker nothing else draws from them, so they are only seeded there: saving and restoring
    numpy's state alone costs about 0.1 ms, 2% of an image's decoding and augmentation."""
    from torch.utils.data import get_worker_info

    states = (
        None
        if get_worker_info() is not None
        else (random.getstate(), np.random.get_state(), torch.default_generator.get_state())
    )
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.default_generator.set_state(states[2])


# ---------------------------------------------------------------------------------------------
# The scan


class FileTable:
    """Relative image paths and labels, packed: one uint8 buffer, offsets and an int64 array."""

    def __init__(self, root: Path, paths: list[str], labels: list[int]):
        encoded = [os.fsencode(p) for p in paths]
        self.root = root
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.blob[self.offsets[index] : self.offsets[index + 1]].tobytes())

    def take(self, indices: list[int]) -> "FileTable":
        paths = [os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes()) for i in indices]
        return FileTable(self.root, paths, [int(self.labels[i]) for i in indices])


def scan(root: Path, val_fraction: float, seed: int) -> tuple[FileTable, FileTable, list[str]]:
    """(training files, validation files, class names) of a class-per-folder tree, or of
    ``root/train`` + ``root/val``; without the split, ``val_fraction`` of each class is held out
    (seeded). Classes are the sorted top-level folders; images are found recursively."""
    if (root / "train").is_dir() != (root / "val").is_dir():
        raise ValueError(f"{root} has only one of train/ and val/; give both, or one folder per class")
    if (root / "train").is_dir():
        train_files = _class_files(root / "train")
        labels = list(train_files)
        val_files = _class_files(root / "val", allow_empty_classes=True)
        unknown = sorted(set(val_files) - set(labels))
        if unknown:
            raise ValueError(f"{root / 'val'} has classes that {root / 'train'} lacks: {', '.join(unknown)}")
        return _table(root / "train", train_files, labels), _table(root / "val", val_files, labels), labels
    files = _class_files(root)
    labels = list(files)
    everything = _table(root, files, labels)
    train, val = stratified_split(torch.from_numpy(everything.labels), val_fraction, seed)
    return everything.take(train.tolist()), everything.take(val.tolist()), labels


def _table(root: Path, files: dict[str, list[str]], labels: list[str]) -> FileTable:
    return FileTable(
        root,
        [f"{name}/{p}" for name, paths in files.items() for p in paths],
        [labels.index(name) for name, paths in files.items() for _ in paths],
    )


def _class_files(folder: Path, allow_empty_classes: bool = False) -> dict[str, list[str]]:
    """Class name -> its image files relative to the class folder (recursively, sorted);
    hidden files and folders are skipped."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} has no class folders; folder:PATH wants PATH/<class>/<image>")
    files = {name: _images_under(folder / name) for name in classes}
    empty = [name for name, paths in files.items() if not paths]
    if len(empty) == len(classes):
        raise ValueError(f"no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if empty and not allow_empty_classes:
        raise ValueError(f"class folders without images in {folder}: {', '.join(empty)}")
    return {name: paths for name, paths in files.items() if paths}


def _images_under(folder: Path) -> list[str]:
    found = []
    for current, subfolders, names in os.walk(folder, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = os.path.relpath(current, folder)
        for name in names:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(name if relative == "." else f"{relative}/{name}")
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Decoding and transforms


def decode(path: Path):
    """The image file's pixels, decoded in full (so truncated data fails here, not later) in the
    file's own mode; a bad file is an :class:`UnreadableImage` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"cannot read image {path}: {one_line(err)}") from None


def _transforms(
    channels: int, size: int, mean: tuple[float, ...], std: tuple[float, ...], augmentation: Augmentation
) -> tuple[Callable, Callable]:
    """timm's (training, evaluation) transforms: PIL image -> normalised C x size x size tensor."""
    from timm.data import create_transform

    common = dict(
        input_size=(channels, size, size),
        interpolation=INTERPOLATION,
        mean=mean,
        std=std,
        crop_pct=augmentation.eval_crop_pct,
    )
    train = create_transform(
        is_training=True, auto_augment=augmentation.auto_augment, re_prob=augmentation.reprob, re_mode="pixel", **common
    )
    return pillow_safe(train), create_transform(is_training=False, **common)


def pillow_safe(transform: Callable) -> Callable:
    """``transform`` with its auto-augment ops' posterize able to keep 0 bits.

    timm 1.0's RandAugment (``inc1``: at magnitude 10) and AutoAugment ``v0`` posterize to 0
    bits, which Pillow 12 and later refuse ("bits must be between or equal to 1 and 8"), so a
    run would stop at a random item; 0 bits gives the black image older Pillow gave.
    """
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", [transform]):
        ops = list(getattr(step, "ops", [])) + [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _posterize(image, bits: int, **_):
    from PIL import Image, ImageOps

    if bits >= 8:
        return image
    return ImageOps.posterize(image, bits) if bits >= 1 else Image.new(image.mode, image.size)


class ImageFiles(Dataset):
    """Image files decoded per item: ``(float32 C x H x W, normalised; int64 label)``.

    ``augment`` selects timm's training transform (seeded per ``(seed, epoch, index)``, see the
    module's docstring) or its evaluation transform; ``set_epoch`` selects the epoch.
    """

    def __init__(
        self, files: FileTable, mode: str, transforms: tuple[Callable, Callable], *, augment: bool, seed: int = 0
    ):
        self.files, self.mode = files, mode
        self.train_transform, self.eval_transform = transforms
        self.augment, self.seed, self.epoch = augment, seed, 0

    @property
    def targets(self) -> torch.Tensor:
        return torch.from_numpy(self.files.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = check_index(index, len(self))
        image = decode(self.files.path(index)).convert(self.mode)
        if self.augment:
            with seeded(item_seed(self.seed, self.epoch, index)):
                pixels = self.train_transform(image)
        else:
            pixels = self.eval_transform(image)
        return pixels, torch.tensor(self.files.labels[index])


def _sample_stats(files: FileTable, size: int) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """(colour mode, mean, std) from up to ``STATS_SAMPLE`` evenly spaced training images,
    each resized to ``size`` x ``size``; mean and std of pixels in [0, 1], rounded to 4 places,
    std 0.5 for a constant channel (which would otherwise divide by zero)."""
    from PIL import Image

    count = min(len(files), STATS_SAMPLE)
    picks = sorted({int(i) for i in np.linspace(0, len(files) - 1, count)})
    modes, arrays = [], []
    for i in picks:
        image = decode(files.path(i))
        modes.append(image.mode)
        arrays.append(
            np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64) / 255
        )
    mode = "L" if all(m in _GRAY_MODES for m in modes) else "RGB"
    pixels = np.stack(arrays).reshape(-1, 3)
    if mode == "L":
        pixels = pixels[:, :1]  # a grayscale image converted to RGB has three equal channels
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    return mode, tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) if s > 1e-3 else 0.5 for s in std)


def load_folder(
    spec: str, root: Path, val_fraction: float, seed: int, img_size: int, augmentation: Augmentation
) -> DataBundle:
    """The :class:`DataBundle` of an image tree: items decoded on demand, nothing in memory."""
    train_files, val_files, labels = scan(root, val_fraction, seed)
    mode, mean, std = _sample_stats(train_files, img_size)
    channels = 1 if mode == "L" else 3
    transforms = _transforms(channels, img_size, mean, std, augmentation)
    return DataBundle(
        spec=spec,
        kind="image",
        train=ImageFiles(train_files, mode, transforms, augment=True, seed=seed),
        val=ImageFiles(val_files, mode, transforms, augment=False, seed=seed),
        num_classes=len(labels),
        input_size=(channels, img_size, img_size),
        labels=labels,
        mean=mean,
        std=std,
        seq_len=None,
        crop_pct=augmentation.eval_crop_pct,
        streamed=True,
    )
