"""Data-parallel training: one process per device, DistributedDataParallel, rank 0 writes.

A run is distributed when it starts under ``torchrun`` (or :func:`launch`, which starts the
same processes itself): the environment names the rank and world size. The backend is gloo
on CPU and NCCL on CUDA. ``--batch-size`` is the *global* batch: rank ``r`` of ``w`` takes
items ``r, r + w, ...`` of each global batch, so the union of the ranks' batches is the batch
a single process would see, and DDP's gradient average equals the single-process gradient.

Batch-norm statistics are computed per process (DDP's default, no SyncBatchNorm): the
normalisation of a batch uses that process's share of it, and the running statistics are
rank 0's (DDP broadcasts buffers from rank 0 before each forward). A family with batch norm
therefore trains slightly differently on 1 and on N processes; LayerNorm families do not.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
            raise ValueError(f"process {local_rank} of this machine has no GPU: {torch.cuda.device_count()} visible; use at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def launch(argv: list[str], nproc: int) -> int:
    """Run ``python -m cli <argv>`` as ``nproc`` processes of one single-machine job.

    What ``torchrun --standalone`` does, kept small so that errors stay one line: each process
    gets RANK, LOCAL_RANK, WORLD_SIZE and a free rendezvous port. Rank 0's output is shown
    as is; other ranks' stderr is kept in a file and shown only if one of them fails alone.
    If any process fails, the others are stopped. SIGTERM and SIGINT are forwarded to every
    process, which stop together with a checkpoint (:mod:`training.signals`); the exit code is
    then rank 0's. Returns the exit code.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="zoo-launch-") as logs:
        procs, err_files, forwarded = [], [], []

        def forward(signum: int, frame) -> None:
            forwarded.append(signum)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        for rank in range(nproc):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            err = None if rank == 0 else open(Path(logs, f"rank{rank}.err"), "w+")
            err_files.append(err)
            out = None if rank == 0 else subprocess.DEVNULL
            procs.append(subprocess.Popen([sys.executable, "-m", "cli", *argv], env=env, stdout=out, stderr=err))
        if forwarded:  # a signal came while starting them: the later ones have not had it
            forward(forwarded[-1], None)
        try:
            failed = _wait_all(procs, forwarded)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for f in err_files:
                if f is not None:
                    f.close()
        if forwarded:  # every process stopped by itself; rank 0 said where
            code = procs[0].returncode
            return code if code >= 0 else 128 - code  # killed before it could handle the signal
        if failed is None:
            return 0
        code = procs[failed].returncode
        if failed != 0:  # rank 0 has printed its own error; another rank's is in its log
            lines = Path(logs, f"rank{failed}.err").read_text(errors="replace").strip().splitlines()
            last = lines[-1].removeprefix("error: ") if lines else f"exit code {code}"
            print(f"error: rank {failed} failed: {last}", file=sys.stderr)
        return code if code > 0 else 1


def _wait_all(procs: list[subprocess.Popen], forwarded: list[int]) -> int | None:
    """Wait for every process; when one fails, stop the rest (they would wait forever).

    Returns the failed rank whose error to show: rank 0 if it failed on its own (it printed
    its error already; a bad flag fails every rank at once), else the first to fail. Once a
    signal was forwarded, non-zero exits are expected: wait for every process (rank 0 may
    still be writing the checkpoint) and return None.
    """
    while True:
        if forwarded:
            for p in procs:
                p.wait()
            return None
        for index, p in enumerate(procs):
            if p.poll() not in (None, 0):
                try:  # give rank 0 a moment to fail by itself and say why
                    procs[0].wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                rank0_failed = procs[0].poll() not in (None, 0)
                _stop(procs)
                return 0 if rank0_failed else index
        if all(p.poll() is not None for p in procs):
            return None
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill the processes still running: without the failed one no step can complete, so
    there is nothing for them to finish (SIGTERM would make them try)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
