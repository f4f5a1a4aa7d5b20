"""What every data source returns, and the helpers the sources share.

:mod:`training.data` (sources held in memory) and :mod:`training.image_folder` (image trees
streamed from disk) both build a :class:`DataBundle`, split by class with the same seeded
shuffle and augment each item under a seed derived from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data file that cannot be read as expected; the message names it, on one line.

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``DataError("Caught ... Original Traceback ...")``; the constructor keeps only the original
    line, so the user still sees which file is bad.
    """

    def __init__(self, message: str):
        prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
        lines = [line[len(prefix) :] for line in message.splitlines() if line.startswith(prefix)]
        super().__init__(lines[-1] if lines else message)


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
    crop_pct: float | None = None  # evaluation: resize to size / crop_pct, centre crop (folders)
    streamed: bool = False  # items are decoded from files when read: worth worker processes


def check_index(index: int, length: int) -> int:
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index


def seed_of(*parts: object) -> int:
    """A 63-bit seed from a hash of ``parts`` (``manual_seed`` takes a non-negative 63-bit int)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def item_seed(seed: int, epoch: int, index: int) -> int:
    return seed_of(seed, epoch, index)


def stratified_split(targets: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
