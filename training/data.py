"""The datasets zoo trains on: small ones held in memory, large ones read from disk per item.

A data spec names the source. ``digits`` (scikit-learn's bundled 8x8 digits) and ``stdlib``
(the Python standard library's own source) need nothing but the Python install, so training
works offline; ``cifar10:PATH`` and ``cifar100:PATH`` read the user's CIFAR batches, decoded
once into memory (an epoch does no per-item file or PIL work). ``folder:PATH`` streams an
image tree from disk through timm's transforms (:mod:`training.image_folder`) and
``text:PATH`` reads byte windows from a cache file built once (:mod:`training.text_cache`):
neither holds its source in memory.

Image items are ``(float32 C x H x W, normalised; int64 label)``. Text items are two int64
windows of ``seq_len`` consecutive bytes, the second shifted by one (inputs, next-byte targets).
Training splits may augment (CIFAR: padded random crop and horizontal flip; folders: timm's
training transform); validation splits never do. Augmentation depends only on
``(seed, epoch, index)``.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .bundle import DataBundle, DataError, check_index, item_seed, stratified_split
from .cifar import read_cifar
from .flags import at_least_one, non_negative
from .workers import loader, running

KNOWN_SPECS = "digits, stdlib, cifar10:PATH, cifar100:PATH, folder:PATH, text:PATH"
STDLIB_MAX_BYTES = 8 * 2**20  # the stdlib corpus is the first 8 MiB of its sorted sources
STDLIB_MAX_FILE_BYTES = 2**20  # larger files are generated tables, not representative code
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
BYTE_VOCAB = 256  # what a byte-level model predicts: the classes of text read as bytes
TEXT_MAX_VAL_BYTES = 2**20  # the held-out tail of a text corpus: val_fraction of it, at most 1 MiB
DEFAULT_FOLDER_SIZE = 224  # folder images without img_size (the trainer passes the model's size)

# (mean, std) of the training images per channel, as published with the datasets' baselines
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class DataConfig:
    """The data of a training run and how it is read (``zoo train``'s data flags)."""

    data: str | None = None  # a data spec (KNOWN_SPECS); default: the model's input kind's
    seq_len: int = 256
    img_size: int | None = None  # default: the dataset's own; for folders, the model's input size
    aa: str | None = None  # folders: timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # folders: random-erasing probability
    crop_pct: float | None = None  # folders: evaluation crop (default 0.875)
    mixup: float = 0.0  # timm Mixup's mixup_alpha (0: off); soft targets
    cutmix: float = 0.0  # timm Mixup's cutmix_alpha (0: off)
    workers: int | None = None  # data-loading processes; default: none in memory, a share of the cores for folders

    def check_flags(self) -> None:
        at_least_one(self, "seq_len", "img_size")
        non_negative(self, "workers", "mixup", "cutmix")

    def check(self, model_name: str, input_kind: str) -> None:
        """What depends on the model's input kind: the spec's options, mixing images."""
        spec = self.data or default_data(input_kind)
        check_data_options(spec, aa=self.aa, reprob=self.reprob, crop_pct=self.crop_pct)
        if (self.mixup or self.cutmix) and input_kind != "image":
            raise ValueError(f"--mixup and --cutmix mix images; {model_name} reads {input_kind}")

    def resolved(self, input_kind: str, model_size: int | None) -> DataConfig:
        """The spec's default filled in; folders (files of any size) at the model's input size."""
        data = self.data or default_data(input_kind)
        folder = data.startswith("folder:") and self.img_size is None
        return dataclasses.replace(self, data=data, img_size=model_size if folder else self.img_size)


def default_data(input_kind: str) -> str:
    """The built-in data spec for a model's input kind: works offline, downloads nothing."""
    specs = {"image": "digits", "tokens": "stdlib"}
    if input_kind not in specs:
        raise ValueError(f"no default data for input kind {input_kind!r}; known: {', '.join(specs)}")
    return specs[input_kind]


def absolute_spec(spec: str) -> str:
    """``spec`` with its path made absolute: what a weights file records, so that the file's
    data is found from any working directory."""
    kind, colon, arg = spec.partition(":")
    if kind in ("cifar10", "cifar100", "folder", "text") and arg:
        return f"{kind}:{Path(arg).expanduser().absolute()}"
    return spec


def load_data(
    spec: str, *, seq_len: int = 256, val_fraction: float = 0.1, seed: int = 0, img_size: int | None = None,
    aa: str | None = None, reprob: float = 0.0, crop_pct: float | None = None, tokenizer: str | None = None,
) -> DataBundle:  # fmt: skip
    """Load a data spec (one of ``KNOWN_SPECS``): small sources into memory, folders and text
    files as on-demand readers.

    ``seq_len`` applies to text, ``img_size`` to images (default: the dataset's own size,
    ``DEFAULT_FOLDER_SIZE`` for folders). ``val_fraction`` is the held-out share where a source
    has no split of its own; ``seed`` fixes that split and the training augmentation. ``aa``
    (timm's auto-augment policy), ``reprob`` (random erasing) and ``crop_pct`` (evaluation
    crop) configure a folder's timm transforms. ``tokenizer`` (a ``tokenizer.json`` text): text
    is read as its tokens (``text:PATH`` only), not as bytes.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size must be at least 1, got {img_size}")
    kind, colon, arg = spec.partition(":")
    check_data_options(spec, aa=aa, reprob=reprob, crop_pct=crop_pct)
    if tokenizer is not None and kind == "stdlib":
        raise ValueError("a family with a tokenizer reads text files as tokens: give --data text:PATH, not stdlib")
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
    if kind == "text" and tokenizer is not None:
        return _token_bundle(spec, path, tokenizer, seq_len, val_fraction)
    if kind == "text":
        from .text_cache import cached_corpus

        cache = cached_corpus(path)
        return _text_bundle(spec, cache, str(path), seq_len, val_fraction)
    if not path.is_dir():
        raise ValueError(f"{kind}:PATH wants a folder, but {path} is a file")
    if kind == "folder":
        from .image_folder import Augmentation, load_folder

        return load_folder(
            spec, path, val_fraction, seed, img_size or DEFAULT_FOLDER_SIZE, Augmentation(aa, reprob, crop_pct)
        )
    return _load_cifar(spec, kind, path, seed, img_size)


def check_data_options(spec: str, *, aa: str | None = None, reprob: float = 0.0, crop_pct: float | None = None) -> None:
    """Refuse transform options the spec's data cannot take (one line, before loading)."""
    from .image_folder import Augmentation, check_augmentation

    options = [
        name
        for name, given in (("--aa", aa is not None), ("--reprob", bool(reprob)), ("--crop-pct", crop_pct is not None))
        if given
    ]
    kind = spec.partition(":")[0]
    if options and kind != "folder":
        raise ValueError(
            f"{' and '.join(options)} configure timm's transforms of folder:PATH images; "
            f"{spec!r} is not an image folder"
        )
    check_augmentation(Augmentation(aa, reprob, crop_pct))


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
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        augment: bool = False,
        seed: int = 0,
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
        index = check_index(index, len(self))
        image = self.images[index]
        if self.augment:
            image = self._augmented(image, index)
        return (image.float() / self.scale - self.mean) / self.std, self.targets[index]

    def _augmented(self, image: torch.Tensor, index: int) -> torch.Tensor:
        self._generator.manual_seed(item_seed(self.seed, self.epoch, index))
        draws = torch.rand(3, generator=self._generator).tolist()
        pad, (height, width) = self.padding, image.shape[-2:]
        top, left = int(draws[0] * (2 * pad + 1)), int(draws[1] * (2 * pad + 1))
        image = F.pad(image, (pad, pad, pad, pad))[:, top : top + height, left : left + width]
        return image.flip(-1) if draws[2] < 0.5 else image


class TokenWindows(Dataset):
    """Byte windows of a corpus: item ``i`` is ``(bytes[s : s+L], bytes[s+1 : s+L+1])``, ``s = i * stride``."""

    def __init__(self, data: torch.Tensor, seq_len: int, stride: int):
        self.data, self.size, self.seq_len, self.stride = data, len(data), seq_len, stride

    def __len__(self) -> int:
        return max(0, (self.size - self.seq_len - 1) // self.stride + 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = check_index(index, len(self)) * self.stride
        window = self.read(start, self.seq_len + 1).long()
        return window[:-1], window[1:]

    def read(self, start: int, count: int) -> torch.Tensor:
        """``count`` bytes of the corpus from ``start``, as uint8."""
        return self.data[start : start + count]

    def target_bytes(self, windows: int) -> int:
        """The bytes of text the targets of the first ``windows`` windows cover (bits per byte's
        denominator): one per target here."""
        return min(windows, len(self)) * self.seq_len


class FileTokenWindows(TokenWindows):
    """The same windows over bytes ``offset .. offset + size`` of a file, read per item with
    ``os.pread`` (see :mod:`training.text_cache` for why not a memory map).

    The file stays open, so a cache replaced meanwhile does not change a running job's data;
    forked loader workers share the descriptor (``pread`` has no file position to share).
    """

    def __init__(self, path: Path, offset: int, size: int, seq_len: int, stride: int):
        self.path, self.offset, self.size, self.seq_len, self.stride = path, offset, size, seq_len, stride
        self.file = open(path, "rb", buffering=0)

    def __getstate__(self) -> dict:  # pickled (a spawned worker): reopen by path
        return {k: v for k, v in self.__dict__.items() if k != "file"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.file = open(self.path, "rb", buffering=0)

    def read(self, start: int, count: int) -> torch.Tensor:
        count = min(count, self.size - start)
        chunk = os.pread(self.file.fileno(), count, self.offset + start)
        if len(chunk) < count:
            raise DataError(
                f"cannot read text cache {self.path}: it ends before byte {self.offset + start + count} "
                "(cut short while this run read it); delete it and run again to rebuild it"
            )
        return torch.frombuffer(bytearray(chunk), dtype=torch.uint8)


class FileTokenIds(FileTokenWindows):
    """Token windows of a token cache (:func:`training.text_cache.cached_tokens`): records
    ``offset .. offset + size`` of the file, an id and the bytes of text it covers each."""

    def _records(self, start: int, count: int) -> np.ndarray:
        from .text_cache import TOKEN_RECORD

        count = min(count, self.size - start)
        width = TOKEN_RECORD.itemsize
        chunk = os.pread(self.file.fileno(), count * width, (self.offset + start) * width)
        if len(chunk) < count * width:
            raise DataError(
                f"cannot read token cache {self.path}: it ends before token {self.offset + start + count} "
                "(cut short while this run read it); delete it and run again to rebuild it"
            )
        return np.frombuffer(chunk, dtype=TOKEN_RECORD)

    def read(self, start: int, count: int) -> torch.Tensor:
        """``count`` token ids from ``start``, as int64."""
        return torch.from_numpy(self._records(start, count)["id"].astype(np.int64))

    def target_bytes(self, windows: int) -> int:
        """The UTF-8 bytes of text the target tokens of the first ``windows`` windows cover."""
        windows = min(windows, len(self))
        return int(self._records(1, windows * self.seq_len)["bytes"].sum()) if windows else 0


# ---------------------------------------------------------------------------------------------
# Loading and batching for the trainer and for calibration


def batches(dataset: Dataset, batch_size: int, limit: int | None = None, workers: int = 0) -> Iterator[torch.Tensor]:
    """Input tensors only, in index order, ``batch_size`` at a time, at most ``limit`` batches,
    read by ``workers`` worker processes (0: in this one).

    For batch-norm recalibration and quantization calibration, which need inputs but no labels.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be at least 1, got {batch_size} and {limit}")
    count = len(dataset) if limit is None else min(len(dataset), limit * batch_size)
    with running(loader(Subset(dataset, range(count)), batch_size=batch_size, num_workers=workers)) as items:
        for inputs, _ in items:
            yield inputs


# ---------------------------------------------------------------------------------------------
# Images


Images = tuple[torch.Tensor, torch.Tensor]  # (N x C x H x W images, N int64 targets)


def _image_bundle(
    spec: str,
    train: Images,
    val: Images,
    labels: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    augment: bool,
    seed: int,
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
    train, val = stratified_split(targets, val_fraction, seed)
    labels = [str(d) for d in range(10)]
    return _image_bundle(
        spec,
        (images[train], targets[train]),
        (images[val], targets[val]),
        labels,
        (0.5,),
        (0.5,),
        augment=False,
        seed=seed,
    )


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to size x size (bilinear, antialiased) in chunks, keeping the storage dtype."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty(*images.shape[:2], size, size, dtype=images.dtype)
    top = 255.0 if images.dtype == torch.uint8 else 1.0
    for start in range(0, len(images), 1024):
        chunk = F.interpolate(
            images[start : start + 1024].float(),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        out[start : start + 1024] = (chunk.round() if images.dtype == torch.uint8 else chunk).clamp(0, top)
    return out


# ---------------------------------------------------------------------------------------------
# CIFAR: python-pickle batches, read without running any code (training/cifar.py)


def _load_cifar(spec: str, kind: str, root: Path, seed: int, img_size: int | None) -> DataBundle:
    labels, (train_images, train_targets), (val_images, val_targets) = read_cifar(kind, root)
    size = img_size or 32
    mean, std = _CIFAR_STATS[kind]
    return _image_bundle(
        spec,
        (_resize(train_images, size), train_targets),
        (_resize(val_images, size), val_targets),
        labels,
        mean,
        std,
        augment=True,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Byte-level text


def _text_bundle(spec: str, data: bytes | Path, source: str, seq_len: int, val_fraction: float) -> DataBundle:
    """Split by region: the last ``val_fraction`` of the bytes (at least one window, at most
    ``TEXT_MAX_VAL_BYTES``) is validation, so validation text is never seen in training.
    Windows do not overlap (stride ``seq_len``): one epoch reads every training byte once.
    ``data`` is the corpus, or a cache file holding it (read per window)."""
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    split, held_out = _text_split(size, seq_len, val_fraction, f"text corpus {source}", "bytes")
    if isinstance(data, Path):
        train, val = (
            FileTokenWindows(data, 0, split, seq_len, seq_len),
            FileTokenWindows(data, split, held_out, seq_len, seq_len),
        )
    else:
        corpus = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        train, val = TokenWindows(corpus[:split], seq_len, seq_len), TokenWindows(corpus[split:], seq_len, seq_len)
    return DataBundle(
        spec=spec,
        kind="tokens",
        train=train,
        val=val,
        num_classes=BYTE_VOCAB,
        input_size=None,
        labels=None,
        mean=None,
        std=None,
        seq_len=seq_len,
    )


def _text_split(size: int, seq_len: int, val_fraction: float, what: str, unit: str) -> tuple[int, int]:
    """Where validation starts, and its length: the last ``val_fraction`` of ``size`` items, at
    least one window, at most ``TEXT_MAX_VAL_BYTES``."""
    window = seq_len + 1
    if size < 2 * window:
        need = f"at least {2 * window} (seq_len + 1 each for train and val)"
        raise ValueError(f"{what} has {size} {unit}; seq_len {seq_len} needs {need}")
    held_out = min(size - window, max(window, min(TEXT_MAX_VAL_BYTES, round(size * val_fraction))))
    return size - held_out, held_out


def _token_bundle(spec: str, path: Path, tokenizer: str, seq_len: int, val_fraction: float) -> DataBundle:
    """``text:PATH`` as the tokens of ``tokenizer``, from a token cache built once; split like
    bytes (the tail is validation, at most ``TEXT_MAX_VAL_BYTES`` tokens)."""
    from .text_cache import TOKEN_RECORD, cached_tokens, tokenizer_vocab_size

    vocab = tokenizer_vocab_size(tokenizer)
    cache = cached_tokens(path.resolve(), tokenizer)
    size = cache.stat().st_size // TOKEN_RECORD.itemsize
    split, held_out = _text_split(size, seq_len, val_fraction, f"text {path} under the family's tokenizer", "tokens")
    train = FileTokenIds(cache, 0, split, seq_len, seq_len)
    val = FileTokenIds(cache, split, held_out, seq_len, seq_len)
    return DataBundle(spec, "tokens", train, val, vocab, None, None, None, None, seq_len)


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
