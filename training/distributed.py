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

A lost process (its machine gone, killed) must not hang the others: every collective gives up
after ``--dist-timeout`` seconds (:data:`DEFAULT_TIMEOUT_S`, not torch's half hour), or at once
when the peer's connection closes. Each process counts up a key of its own in the job's store
(torchrun's, at MASTER_ADDR:MASTER_PORT) every :data:`HEARTBEAT_S`; when a collective fails,
the counts that stopped name the lost ranks and their nodes (:meth:`DistContext.lost`), and the
survivors exit with that one line (:class:`LostProcess`). Under torchrun's restarts
(``--max-restarts``) the survivors are started again and resume from the last checkpoint.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .signals import die_with_parent

DEFAULT_TIMEOUT_S = 300.0  # --dist-timeout: rank 0's periodic evaluation and checkpoints fit well within it
HEARTBEAT_S = 1.0
SILENT_BEATS = 3  # heartbeats a live process cannot miss: one that did is lost
STORE_TIMEOUT_S = 30.0


class LostProcess(ConnectionError):
    """Another process of the job is gone (or stopped answering): one line naming it; ``cause``
    is what the failed collective said."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class Heartbeat:
    """This process's count in the job's store, bumped every :data:`HEARTBEAT_S` by a thread
    (collectives release the GIL, so it beats while the process waits in one), and where each
    rank runs (its node and host), to name it."""

    def __init__(self, rank: int, world_size: int, attempt: int):
        self.rank, self.world_size = rank, world_size
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
        )  # fmt: skip
        self.store = dist.PrefixStore(f"zoo/heartbeat/{attempt}/", store)
        self.store.set(f"where/{rank}", f"node {os.environ.get('GROUP_RANK', '?')} on {socket.gethostname()}")
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="zoo-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # the store is gone: the failing collective says so to the main thread
                return

    def silent(self) -> list[int]:
        """The ranks whose count stopped over :data:`SILENT_BEATS` heartbeats."""
        before = [self.store.add(f"beat/{r}", 0) for r in range(self.world_size)]
        time.sleep(SILENT_BEATS * HEARTBEAT_S)
        after = [self.store.add(f"beat/{r}", 0) for r in range(self.world_size)]
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def where(self, rank: int) -> str:
        key = f"where/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else "not yet started"

    def stop(self) -> None:
        self._stop.set()


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    restart: int = 0  # torchrun's restart count (--max-restarts): 0 in the first attempt
    heartbeat: Heartbeat | None = None

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

    def lost(self, err: BaseException) -> LostProcess | None:
        """If ``err`` came from a collective that failed because another process is gone: a
        :class:`LostProcess` naming that process (or the job's store, if it went with it)."""
        if self.heartbeat is None or not isinstance(err, RuntimeError):
            return None
        cause = _cause(err)
        try:
            silent = self.heartbeat.silent()
            if not silent:
                return None
            lost = ", ".join(f"rank {r} ({self.heartbeat.where(r)})" for r in silent)
        except Exception:  # the store's own failure is the answer
            return LostProcess(f"lost the job's store at {self.heartbeat.address} (the rendezvous host)", cause)
        return LostProcess(f"lost {lost} of {self.world_size} processes", cause)

    def close(self, failed: bool = False) -> None:
        """Leave the process group; after a failed collective, only stop the heartbeat (the group
        cannot be torn down in step with processes that are gone)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.distributed and dist.is_initialized() and not failed:
            dist.destroy_process_group()


def _cause(err: BaseException) -> str:
    """The first sentence of a collective's error, without gloo's source location."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0]


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda``; asking for CUDA without it is an error, never a fallback."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group described by the environment (if any) and pick the device;
    collectives give up after ``timeout_s`` seconds."""
    device = resolve_device(device_name)
    world_size = world_size_from_env()
    if launched_by_torchrun():
        die_with_parent(os.getppid())  # torchrun's agent: a trainer left without it is a lost process
    if world_size == 1:
        return DistContext(0, 1, device, restart_count())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"process {local_rank} of this machine has no GPU: {torch.cuda.device_count()} visible; "
                "use at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    rank, world_size, restart = dist.get_rank(), dist.get_world_size(), restart_count()
    return DistContext(rank, world_size, device, restart, Heartbeat(rank, world_size, restart))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def restart_count() -> int:
    """How many times torchrun restarted this job's processes (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@dataclass
class DistConfig:
    """Where a run computes (``zoo train --device``, ``--sync-bn``); torch's launcher starts the processes."""

    device: str = "auto"
    sync_bn: bool = False  # batch-norm statistics over the global batch (training.sync_bn)
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a collective waits for a lost process

    def check(self, model: torch.nn.Module) -> torch.device:
        """The device this configuration resolves to; refuses --sync-bn without batch norm."""
        if self.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be positive, got {self.dist_timeout}")
        device = resolve_device(self.device)
        if self.sync_bn:
            from .sync_bn import SyncBatchNorm

            SyncBatchNorm(model)
        return device
