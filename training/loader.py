"""The trainer's batches: a seeded global order, each process's share, worker processes, mixup.

Epoch ``e``'s order is a permutation seeded by ``(seed, e)`` alone; its global batch ``k`` is
items ``k * B .. (k + 1) * B - 1`` of it, and rank ``r`` of ``w`` processes takes items
``r, r + w, ...`` of that batch (so the ranks' shares together are the batch one process would
see). Every item is augmented by ``(seed, e, index)`` and every batch mixed (timm's ``Mixup``)
by ``(seed, e, k, r)``, so a batch is the same whichever process, worker or resumed run builds it.

A worker builds a whole batch (the sampler hands it ``(epoch, k, indices)``), mixup included:
the main process only moves batches to the device. With workers the loader keeps them for the
whole run (persistent workers: an epoch starts without forking again), and pins memory on CUDA.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .bundle import DataBundle, seed_of
from .image_folder import seeded
from .workers import worker_init

MAX_DEFAULT_WORKERS = 8


def default_workers(bundle: DataBundle) -> int:
    """Worker processes when ``--workers`` is not given: none for data held in memory; for
    files decoded per item, this process's share of the CPU cores less one for the training
    process itself, between 1 and ``MAX_DEFAULT_WORKERS``."""
    if not bundle.streamed:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_DEFAULT_WORKERS, cores // processes - 1))


class _EpochKeys(Sampler):
    """Yields ``(epoch, k, indices)`` for this process's share of global batches ``start..``."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return max(0, self.size // self.batch_size - self.start)

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(seed_of("order", self.seed, self.epoch))
        )
        for k in range(self.start, self.size // self.batch_size):
            yield (
                self.epoch,
                k,
                order[k * self.batch_size : (k + 1) * self.batch_size][self.rank :: self.world_size].tolist(),
            )


class _Batches(Dataset):
    """Key ``(epoch, k, indices)`` -> the collated batch, mixed when ``mixup`` is set."""

    def __init__(self, dataset: Dataset, mixup, seed: int, rank: int):
        self.dataset, self.mixup, self.seed, self.rank = dataset, mixup, seed, rank

    def __getitem__(self, key: tuple[int, int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k, indices = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        inputs, targets = default_collate([self.dataset[i] for i in indices])
        if self.mixup is not None:
            with seeded(seed_of("mixup", self.seed, epoch, k, self.rank)):
                inputs, targets = self.mixup(inputs, targets)
        return inputs, targets


class TrainLoader:
    """This process's training batches, epoch by epoch (see the module's docstring).

    ``mixup`` and ``cutmix`` are timm's ``mixup_alpha`` and ``cutmix_alpha`` (0: off); with
    either, targets are soft (``label_smoothing`` is then folded into them, as timm does) and
    each process's batch must be even (timm mixes a batch with its reverse).
    """

    def __init__(
        self, bundle: DataBundle, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, workers: int = 0,
        pin_memory: bool = False, mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0,
    ):  # fmt: skip
        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} does not split evenly over {world_size} processes")
        mixer = None
        if mixup or cutmix:
            if bundle.kind != "image":
                raise ValueError("--mixup and --cutmix mix images; this data holds tokens")
            if (batch_size // world_size) % 2:
                raise ValueError(
                    "--mixup and --cutmix mix each process's batch with its reverse: "
                    f"it must be even, got {batch_size // world_size}"
                )
            from timm.data import Mixup

            mixer = Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=bundle.num_classes
            )
        self.keys = _EpochKeys(len(bundle.train), batch_size, seed, rank, world_size)
        self.loader = DataLoader(
            _Batches(bundle.train, mixer, seed, rank),
            batch_size=None,  # a key is a whole batch
            sampler=self.keys,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_memory,
            generator=torch.Generator(),  # the loader's own seed must not draw from the global RNG
            worker_init_fn=worker_init(os.getpid()),  # training.workers: how they stop
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from global batch ``start`` on."""
        self.keys.epoch, self.keys.start = epoch, start
        yield from self.loader

    def close(self) -> None:
        """Stop the worker processes (they would otherwise live until the loader is collected)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
