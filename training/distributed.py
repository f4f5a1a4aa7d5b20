"""Data-parallel training: one process per device, DistributedDataParallel, rank 0 writes.

A run is distributed when it starts under ``torchrun`` (``zoo train --nproc-per-node`` hands
itself to it: :mod:`training.launch`): the environment names the rank and world size. The
backend is gloo on CPU and NCCL on CUDA. ``--batch-size`` is the *global* batch: rank ``r`` of ``w`` takes
items ``r, r + w, ...`` of each global batch, so the union of the ranks' batches is the batch
a single process would see, and DDP's gradient average equals the single-process gradient.

Batch-norm statistics are computed per process by default (DDP's default): the
normalisation of a batch uses that process's share of it, and the running statistics are
rank 0's (DDP broadcasts buffers from rank 0 before each forward). A family with batch norm
therefore trains slightly differently on 1 and on N processes, unless ``--sync-bn``
(:mod:`training.sync_bn`); LayerNorm families do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The average of ``values`` over all processes (identity when not distributed)."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world_size

    def agreed_signal(self, signum: int | None) -> int | None:
        """The stop signal any process received (the largest number), so all stop at one step."""
        if not self.distributed:
            return signum
        flag = torch.tensor([signum or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda``; asking for CUDA without it is an error, never a fallback."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str) -> DistContext:
    """Join the process group described by the environment (if any) and pick the device."""
    device = resolve_device(device_name)
    world_size = world_size_from_env()
    if world_size == 1:
        return DistContext(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"process {local_rank} of this machine has no GPU: {torch.cuda.device_count()} visible; use at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


@dataclass
class DistConfig:
    """Where a run computes (``zoo train --device``, ``--sync-bn``); torch's launcher starts the processes."""

    device: str = "auto"
    sync_bn: bool = False  # batch-norm statistics over the global batch (training.sync_bn)

    def check(self, model: torch.nn.Module) -> torch.device:
        """The device this configuration resolves to; refuses --sync-bn without batch norm."""
        device = resolve_device(self.device)
        if self.sync_bn:
            from .sync_bn import SyncBatchNorm

            SyncBatchNorm(model)
        return device
