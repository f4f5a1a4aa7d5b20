"""Datasets zoo trains on, held in memory as tensors: images (uint8 where possible) and bytes.

A data spec names the source. ``digits`` (scikit-learn's bundled 8x8 digits) and ``stdlib``
(the Python standard library's own source) need nothing but the Python install, so training
works offline; ``cifar10:PATH``, ``cifar100:PATH``, ``folder:PATH`` and ``text:PATH`` read the
user's files. Everything is decoded once at load time; datasets only index tensors, so an
epoch does no per-item file or PIL work.

Image items are ``(float32 C x H x W, normalised; int64 label)``. Text items are two int64
windows of ``seq_len`` consecutive bytes, the second shifted by one (inputs, next-byte targets).
Training splits may augment (CIFAR and folders: padded random crop and horizontal flip);
validation splits never do.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

KNOWN_SPECS = "digits, stdlib, cifar10:PATH, cifar100:PATH, folder:PATH, text:PATH"
STDLIB_MAX_BYTES = 8 * 2**20  # the stdlib corpus is the first 8 MiB of its sorted sources
STDLIB_MAX_FILE_BYTES = 2**20  # larger files are generated tables, not representative code
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}
_BINARY_SNIFF_BYTES = 8000  # git's rule: a NUL byte in the first 8000 bytes means binary

# (mean, std) of the training images per channel, as published with the datasets' baselines
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# kind -> (training batches, test batch, meta file, label key, label-names key, archive folder)
_CIFAR_LAYOUT = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", b"labels", b"label_names", "cifar-10-batches-py"),
    "cifar100": (["train"], "test", "meta", b"fine_labels", b"fine_label_names", "cifar-100-python"),
}


@dataclass
class DataBundle:
    """A loaded dataset: both splits plus what a model and an export need to know about it."""

    spec: str  # the spec it was loaded from, e.g. "digits" or "cifar10:/path"
    kind: str  # "image" or "tokens"
    train: Dataset
    val: Dataset
    num_classes: int  # classes; 256 for byte-level text
    input_size: tuple[int, int, int] | None  # (C, H, W) for images, None for text
    labels: list[str] | None  # class names for images, None for text
    mean: tuple[float, ...] | None  # normalisation applied (images), to record in exports
    std: tuple[float, ...] | None
    seq_len: int | None  # window length for text


def default_data(input_kind: str) -> str:
    """The built-in data spec for a model's input kind: works offline, downloads nothing."""
    specs = {"image": "digits", "tokens": "stdlib"}
    if input_kind not in specs:
        raise ValueError(f"no default data for input kind {input_kind!r}; known: {', '.join(specs)}")
    return specs[input_kind]


def load_data(spec: str, *, seq_len: int = 256, val_fraction: float = 0.1, seed: int = 0, img_size: int | None = None) -> DataBundle:
    """Load a data spec (one of ``KNOWN_SPECS``) into memory.

    ``seq_len`` applies to text, ``img_size`` to images (default: the dataset's own size, 32
    for folders). ``val_fraction`` is the held-out share where a source has no split of its
    own; ``seed`` fixes that split and the training augmentation.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size must be at least 1, got {img_size}")
    kind, colon, arg = spec.partition(":")
    if kind in ("digits", "stdlib"):
        if colon:
            raise ValueError(f"data spec {kind!r} takes no path, got {spec!r}")
        if kind == "digits":
            return _load_digits(spec, val_fraction, seed, img_size)
        return _text_bundle(spec, _stdlib_source(), "stdlib", seq_len, val_fraction)
    if kind not in ("cifar10", "cifar100", "folder", "text"):
        raise ValueError(f"unknown data spec {spec!r}; known: {KNOWN_SPECS}")
    if not arg:
        raise ValueError(f"data spec {kind!r} needs a path: {kind}:PATH")
    path = Path(arg).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if kind == "text":
        return _text_bundle(spec, _read_text(path), str(path), seq_len, val_fraction)
    if not path.is_dir():
        raise ValueError(f"{kind}:PATH wants a folder, but {path} is a file")
    if kind == "folder":
        return _load_folder(spec, path, val_fraction, seed, img_size)
    return _load_cifar(spec, kind, path, seed, img_size)


# ---------------------------------------------------------------------------------------------
# Datasets


class ImageDataset(Dataset):
    """Images held as one tensor; items are normalised on the fly, optionally augmented.

    ``images`` is N x C x H x W, uint8 (0..255) or float (0..1). With ``augment`` an item is
    padded by ``H // 8`` pixels (4 at 32 x 32), randomly cropped back to H x W, and flipped
    horizontally with probability 1/2.

    Reproducibility contract: the augmentation of item ``i`` in epoch ``e`` depends only on
    ``(seed, e, i)``; not on item order, batch composition, worker count or earlier items. The
    dataset's own ``torch.Generator`` is re-seeded from a hash of that triple per item, so a run
    resumed at epoch ``e`` (``set_epoch(e)``, same ``seed``) sees exactly the same tensors.
    """

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, augment: bool = False, seed: int = 0
    ):
        self.images, self.targets = images, targets
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 255.0 if images.dtype == torch.uint8 else 1.0
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.padding = max(1, images.shape[-2] // 8)
        self._generator = torch.Generator()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation the next items get."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = _check_index(index, len(self))
        image = self.images[index]
        if self.augment:
            image = self._augmented(image, index)
        return (image.float() / self.scale - self.mean) / self.std, self.targets[index]

    def _augmented(self, image: torch.Tensor, index: int) -> torch.Tensor:
        self._generator.manual_seed(_item_seed(self.seed, self.epoch, index))
        draws = torch.rand(3, generator=self._generator).tolist()
        pad, (height, width) = self.padding, image.shape[-2:]
        top, left = int(draws[0] * (2 * pad + 1)), int(draws[1] * (2 * pad + 1))
        image = F.pad(image, (pad, pad, pad, pad))[:, top : top + height, left : left + width]
        return image.flip(-1) if draws[2] < 0.5 else image


class TokenWindows(Dataset):
    """Byte windows of a corpus: item ``i`` is ``(bytes[s : s+L], bytes[s+1 : s+L+1])``, ``s = i * stride``."""

    def __init__(self, data: torch.Tensor, seq_len: int, stride: int):
        self.data, self.seq_len, self.stride = data, seq_len, stride

    def __len__(self) -> int:
        return max(0, (len(self.data) - self.seq_len - 1) // self.stride + 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = _check_index(index, len(self)) * self.stride
        window = self.data[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index


def _item_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit int


# ---------------------------------------------------------------------------------------------
# Loading and batching for the trainer and for calibration


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """A loader for one epoch: order and augmentation depend only on (seed, epoch).

    Build one per epoch, so a resumed run replays the same order and augmentation. It sets the
    dataset's epoch (``set_epoch``) where the dataset has one. With ``world_size > 1`` each rank
    reads its own share, padded to equal length (torch's ``DistributedSampler``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=0)


def batches(dataset: Dataset, batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Input tensors only, in index order, ``batch_size`` at a time, at most ``limit`` batches.

    For batch-norm recalibration and quantization calibration, which need inputs but no labels.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be at least 1, got {batch_size} and {limit}")
    count = len(dataset) if limit is None else min(len(dataset), limit * batch_size)
    for start in range(0, count, batch_size):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, count))])


# ---------------------------------------------------------------------------------------------
# Images


Images = tuple[torch.Tensor, torch.Tensor]  # (N x C x H x W images, N int64 targets)


def _image_bundle(
    spec: str, train: Images, val: Images, labels: list[str], mean: tuple[float, ...], std: tuple[float, ...], *, augment: bool, seed: int
) -> DataBundle:
    return DataBundle(
        spec=spec,
        kind="image",
        train=ImageDataset(*train, mean, std, augment=augment, seed=seed),
        val=ImageDataset(*val, mean, std),
        num_classes=len(labels),
        input_size=tuple(train[0].shape[1:]),
        labels=labels,
        mean=mean,
        std=std,
        seq_len=None,
    )


def _load_digits(spec: str, val_fraction: float, seed: int, img_size: int | None) -> DataBundle:
    """Digits: 1797 images of 8 x 8 pixels, values 0..16, split per class. Never augmented: a
    flipped or shifted 8-pixel digit is often a different digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _resize(torch.tensor(digits.images, dtype=torch.float32).div_(16).unsqueeze(1), img_size or 8)
    targets = torch.tensor(digits.target, dtype=torch.int64)
    train, val = _stratified_split(targets, val_fraction, seed)
    labels = [str(d) for d in range(10)]
    return _image_bundle(spec, (images[train], targets[train]), (images[val], targets[val]), labels, (0.5,), (0.5,), augment=False, seed=seed)


def _stratified_split(targets: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``val_fraction`` of every class (at least one item where a class has two or
    more), chosen by a seeded shuffle; indices come back sorted."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in torch.unique(targets).tolist():
        members = torch.nonzero(targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held_out = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val.append(members[:held_out])
        train.append(members[held_out:])
    val_indices = torch.cat(val).sort().values
    if len(val_indices) == 0:
        raise ValueError("too few images to hold out a validation split: every class has a single image")
    return torch.cat(train).sort().values, val_indices


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to size x size (bilinear, antialiased) in chunks, keeping the storage dtype."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty(*images.shape[:2], size, size, dtype=images.dtype)
    top = 255.0 if images.dtype == torch.uint8 else 1.0
    for start in range(0, len(images), 1024):
        chunk = F.interpolate(images[start : start + 1024].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 1024] = (chunk.round() if images.dtype == torch.uint8 else chunk).clamp(0, top)
    return out


def _load_folder(spec: str, root: Path, val_fraction: float, seed: int, img_size: int | None) -> DataBundle:
    """PATH/<class>/<image>, or PATH/train/<class>/... with PATH/val/<class>/... .

    Images become RGB, or L if every image is grayscale; each is centre-cropped to a square and
    resized to ``img_size`` (32 by default). Mean and std come from the training split.
    """
    if (root / "train").is_dir() != (root / "val").is_dir():
        raise ValueError(f"{root} has only one of train/ and val/; give both, or one folder per class")
    if (root / "train").is_dir():
        train_files = _class_files(root / "train")
        labels = list(train_files)
        val_files = _class_files(root / "val", allow_empty_classes=True)
        unknown = sorted(set(val_files) - set(labels))
        if unknown:
            raise ValueError(f"{root / 'val'} has classes that {root / 'train'} lacks: {', '.join(unknown)}")
        train_items = [(path, labels.index(c)) for c, paths in train_files.items() for path in paths]
        val_items = [(path, labels.index(c)) for c, paths in val_files.items() for path in paths]
    else:
        files = _class_files(root)
        labels = list(files)
        items = [(path, label) for label, paths in enumerate(files.values()) for path in paths]
        train, val = _stratified_split(torch.tensor([label for _, label in items]), val_fraction, seed)
        train_items, val_items = [items[i] for i in train.tolist()], [items[i] for i in val.tolist()]
    mode = "L" if all(_image_mode(path) in _GRAY_MODES for path, _ in train_items + val_items) else "RGB"
    size = img_size or 32
    train_images = _decode([path for path, _ in train_items], mode, size)
    val_images = _decode([path for path, _ in val_items], mode, size)
    mean, std = _channel_stats(train_images)
    train_targets = torch.tensor([label for _, label in train_items], dtype=torch.int64)
    val_targets = torch.tensor([label for _, label in val_items], dtype=torch.int64)
    return _image_bundle(spec, (train_images, train_targets), (val_images, val_targets), labels, mean, std, augment=True, seed=seed)


def _class_files(folder: Path, allow_empty_classes: bool = False) -> dict[str, list[Path]]:
    """Class name -> its image files (recursively, sorted); hidden files and folders skipped."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} has no class folders; folder:PATH wants PATH/<class>/<image>")
    files = {
        name: sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p, folder) and p.is_file())
        for name in classes
    }
    empty = [name for name, paths in files.items() if not paths]
    if len(empty) == len(classes):
        raise ValueError(f"no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if empty and not allow_empty_classes:
        raise ValueError(f"class folders without images in {folder}: {', '.join(empty)}")
    return {name: paths for name, paths in files.items() if paths}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_mode(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {_one_line(err)}") from None


def _decode(paths: list[Path], mode: str, size: int) -> torch.Tensor:
    from PIL import Image, ImageOps

    channels = 1 if mode == "L" else 3
    out = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = ImageOps.fit(image.convert(mode), (size, size), Image.Resampling.BILINEAR)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {_one_line(err)}") from None
        out[i] = torch.from_numpy(np.array(image, dtype=np.uint8).reshape(size, size, channels)).permute(2, 0, 1)
    return out


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1], rounded to 4 places; std 0.5 for a
    constant channel, which would otherwise divide by zero."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), 1024):
        chunk = images[start : start + 1024].double() / 255
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(round(m, 4) for m in mean.tolist()), tuple(round(s, 4) if s > 1e-3 else 0.5 for s in std.tolist())


# ---------------------------------------------------------------------------------------------
# CIFAR: python-pickle batches, read without running any code


def _load_cifar(spec: str, kind: str, root: Path, seed: int, img_size: int | None) -> DataBundle:
    train_names, test_name, meta_name, label_key, names_key, archive_folder = _CIFAR_LAYOUT[kind]
    if not (root / meta_name).exists() and (root / archive_folder).is_dir():
        root = root / archive_folder  # the folder that contains the extracted archive
    meta = _cifar_dict(root, meta_name, kind)
    names = meta.get(names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise ValueError(f"{root / meta_name}: no {names_key.decode()} list of class names")
    labels = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    parts = [_cifar_batch(root, name, kind, label_key, len(labels)) for name in train_names]
    train = torch.cat([images for images, _ in parts]), torch.cat([targets for _, targets in parts])
    val_images, val_targets = _cifar_batch(root, test_name, kind, label_key, len(labels))
    size = img_size or 32
    mean, std = _CIFAR_STATS[kind]
    return _image_bundle(spec, (_resize(train[0], size), train[1]), (_resize(val_images, size), val_targets), labels, mean, std, augment=True, seed=seed)


def _cifar_dict(root: Path, name: str, kind: str) -> dict:
    path = root / name
    if not path.is_file():
        train_names, test_name, meta_name = _CIFAR_LAYOUT[kind][:3]
        raise FileNotFoundError(f"{path} not found: {kind}:PATH wants the python batches {', '.join(train_names + [test_name, meta_name])}")
    loaded = _unpickle_data(path)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a {kind} batch file (it holds a {type(loaded).__name__}, not a dict)")
    return {(k.encode() if isinstance(k, str) else k): v for k, v in loaded.items()}


def _cifar_batch(root: Path, name: str, kind: str, label_key: bytes, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = root / name
    batch = _cifar_dict(root, name, kind)
    data, targets = _as_array(batch.get(b"data")), _as_array(batch.get(label_key))
    if data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' is not a uint8 array of N x 3072 pixels")
    in_range = targets is not None and targets.shape == (len(data),) and targets.dtype.kind in "iu"
    if not in_range or (len(targets) and not 0 <= targets.min() <= targets.max() < num_classes):
        raise ValueError(f"{path}: {label_key!r} is not {len(data)} labels in 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(targets.astype(np.int64))


def _as_array(value: object) -> np.ndarray | None:
    if isinstance(value, _ArrayStandIn):
        return value.array
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list):
        return np.asarray(value)
    return None


class _RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something beyond plain data and numeric arrays."""


class _DtypeStandIn:
    """Inert stand-in for ``numpy.dtype``: plain numeric types only, byte order from its state."""

    def __init__(self, code: object, align: object = False, copy: object = True):
        code = code.decode("ascii", "replace") if isinstance(code, bytes) else code
        if code not in ("b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"):
            raise _RefusedPickle(f"array type {code!r} is not a plain numeric type")
        self.dtype = np.dtype(code)

    def __setstate__(self, state: object) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayStandIn:
    """Inert stand-in for ``numpy.ndarray``: its pickled state (shape, type, raw bytes) becomes
    ``array``, built by ``numpy.frombuffer``."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _RefusedPickle("malformed array state")
        shape, dtype, fortran_order, raw = state[-4:]  # (version,) shape, dtype, fortran order, bytes
        self.array = _array_from(raw, dtype, shape, "F" if fortran_order else "C")


def _reconstruct(cls: object, shape: object = (0,), typecode: object = b"b") -> _ArrayStandIn:
    if cls is not _ArrayStandIn:
        raise _RefusedPickle("array reconstruction of something that is not an array")
    return _ArrayStandIn()


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """Stand-in for ``numpy.core.numeric._frombuffer``, which pickle protocol 5 uses."""
    return _array_from(buffer, dtype, shape, "F" if order == "F" else "C")


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, with which Python 3 writes bytes at pickle protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedPickle("_codecs.encode is only accepted for latin-1 text")
    return text.encode("latin1")


def _array_from(raw: object, dtype: object, shape: object, order: str) -> np.ndarray:
    if not isinstance(dtype, _DtypeStandIn) or not isinstance(raw, (bytes, bytearray)):
        raise _RefusedPickle("malformed array")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _RefusedPickle("malformed array shape")
    if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
        raise _RefusedPickle(f"array data holds {len(raw)} bytes, but shape {shape} of {dtype.dtype} needs {math.prod(shape) * dtype.dtype.itemsize}")
    return np.frombuffer(raw, dtype.dtype).reshape(shape, order=order)


_STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayStandIn,
    ("numpy", "dtype"): _DtypeStandIn,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_bytes,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global at all, so loading a file can run no code.

    CIFAR ships as pickles, and unpickling normally imports and calls whatever the file names
    (``os.system`` included). Here ``find_class`` never returns a real module attribute: the
    few names that plain numpy arrays need are answered with the inert stand-ins above, which
    only rebuild numeric arrays from raw bytes; any other name refuses the file.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _STAND_INS[(module, name)]
        except KeyError:
            raise _RefusedPickle(f"it names {module}.{name}; only plain data and numeric arrays are loaded") from None


def _unpickle_data(path: Path) -> object:
    with open(path, "rb") as file:
        try:
            return _DataOnlyUnpickler(file, encoding="bytes").load()
        except _RefusedPickle as err:
            raise ValueError(f"{path}: refused to load: {_one_line(err)}") from None
        except Exception as err:  # truncated or not a pickle: unpickling raises many kinds
            raise ValueError(f"{path}: corrupt or truncated batch file ({type(err).__name__}: {_one_line(err)})") from None


# ---------------------------------------------------------------------------------------------
# Byte-level text


def _text_bundle(spec: str, data: bytes, source: str, seq_len: int, val_fraction: float) -> DataBundle:
    """Split by region: the last ``val_fraction`` of the bytes (at least one window) is
    validation, so validation text is never seen in training. Windows do not overlap (stride
    ``seq_len``): one epoch reads every training byte once."""
    window = seq_len + 1
    if len(data) < 2 * window:
        need = f"at least {2 * window} (seq_len + 1 each for train and val)"
        raise ValueError(f"text corpus {source} has {len(data)} bytes; seq_len {seq_len} needs {need}")
    held_out = min(len(data) - window, max(window, round(len(data) * val_fraction)))
    corpus = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = len(data) - held_out
    return DataBundle(
        spec=spec,
        kind="tokens",
        train=TokenWindows(corpus[:split], seq_len, stride=seq_len),
        val=TokenWindows(corpus[split:], seq_len, stride=seq_len),
        num_classes=256,
        input_size=None,
        labels=None,
        mean=None,
        std=None,
        seq_len=seq_len,
    )


def _stdlib_source() -> bytes:
    """The standard library's .py files, sorted by path and concatenated, capped at
    ``STDLIB_MAX_BYTES``; site-packages, test folders and files over 1 MiB are skipped. The
    corpus depends on the Python version, nothing else."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _STDLIB_SKIP_DIRS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    corpus = bytearray()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        if len(corpus) >= STDLIB_MAX_BYTES:
            break
        if path.stat().st_size <= STDLIB_MAX_FILE_BYTES:
            corpus += path.read_bytes()
    return bytes(corpus[:STDLIB_MAX_BYTES])


def _read_text(path: Path) -> bytes:
    """A text file, or every text file under a folder (recursively, sorted by path, hidden
    files and folders skipped) concatenated. Binary files are refused or skipped."""
    if path.is_file():
        text = _text_or_none(path)
        if text is None:
            raise ValueError(f"{path} is not a text file (it has NUL bytes)")
        return text
    files = sorted((p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)), key=lambda p: p.relative_to(path).as_posix())
    text = b"".join(t for t in map(_text_or_none, files) if t is not None)
    if not text:
        raise ValueError(f"no text under {path} (binary and hidden files are skipped)")
    return text


def _text_or_none(path: Path) -> bytes | None:
    with open(path, "rb") as file:
        head = file.read(_BINARY_SNIFF_BYTES)
        return None if b"\0" in head else head + file.read()


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
