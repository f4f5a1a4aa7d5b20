"""``zoo train --nproc-per-node N [--nnodes M ...]``: torch's own launcher starts the processes.

The command hands itself to ``torch.distributed.run`` (torchrun's code, called in-process), which
starts ``python -m cli <the same arguments>`` ``N`` times on this machine, joins the machines
of a multi-node job in a c10d rendezvous and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; each started process sees that it runs under torchrun (``TORCHELASTIC_RUN_ID``)
and trains (:mod:`training.distributed`). Running ``torchrun -m cli train ...`` by hand is the
same thing.

- One machine: ``--standalone`` (a private rendezvous on a free port).
- Several: the same command on every machine with ``--nnodes M --rdzv-endpoint HOST:PORT``
  (HOST: the machine of node 0, any free port) and the same ``--rdzv-id``. Ranks are assigned
  by the rendezvous; ``--node-rank 0`` names the machine that hosts the rendezvous store
  (without it, the machine whose address is HOST does).
- Elastic: ``--nnodes MIN:MAX`` starts once MIN nodes have met (and waits torchrun's last call,
  30 s, for more, up to MAX), and ``--max-restarts N`` lets torchrun restart every process up to
  N times when one fails or the membership changes: a node lost (a failed collective,
  :mod:`training.distributed`), or one joining. The processes started again resume from the
  last checkpoint (it must be on storage every node reads), on the nodes that remain. The node
  hosting the rendezvous store (node 0) cannot be lost. torchrun's settings not given as flags
  come from its ``PET_*`` environment variables; ``PET_RDZV_CONF`` (e.g.
  ``last_call_timeout=10``) is merged with zoo's own rendezvous settings.

What zoo adds to torchrun, so that errors stay one line: only local rank 0 writes to the
terminal (the others' output goes to log files, and the last line of a failed rank's is
shown), torchrun's own log messages are silenced, and its failures become one-line errors.
SIGTERM and SIGINT reach torchrun, which forwards them to every process; they finish the step
and stop together with a checkpoint (:mod:`training.signals`), and torchrun waits up to
:data:`SHUTDOWN_TIMEOUT_S` for them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHUTDOWN_TIMEOUT_S = 300  # a stopping process finishes its step and writes a checkpoint first
_ENDPOINT = re.compile(r"^\[?([A-Za-z0-9_.:-]+?)\]?:(\d+)$")


@dataclass
class Launch:
    """Where the processes of a run go: torchrun's single- and multi-node settings."""

    nproc_per_node: int = 1
    nnodes: str = "1"  # N, or MIN:MAX (elastic)
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "zoo"
    max_restarts: int = 0

    @property
    def node_range(self) -> tuple[int, int]:
        """(MIN, MAX) nodes; ValueError for anything but N or MIN:MAX with 1 <= MIN <= MAX."""
        match = re.fullmatch(r"(\d+)(?::(\d+))?", str(self.nnodes).strip())
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
        if not 1 <= low <= high:
            raise ValueError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {self.nnodes!r}")
        return low, high

    def check(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be at least 0, got {self.max_restarts}")
        _, most = self.node_range
        if self.node_rank is not None and not 0 <= self.node_rank < most:
            raise ValueError(f"--node-rank must be in [0, {most - 1}] for --nnodes {self.nnodes}, got {self.node_rank}")
        if most > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (the machine of node 0, a free port), "
                "the same on every node"
            )
        if self.rdzv_endpoint is not None:
            match = _ENDPOINT.match(self.rdzv_endpoint)
            if not match or not 0 < int(match[2]) < 65536:
                raise ValueError(
                    f"--rdzv-endpoint must be HOST:PORT with a port in 1..65535, got {self.rdzv_endpoint!r}"
                )
        if not self.rdzv_id or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.rdzv_id):
            raise ValueError(
                f"--rdzv-id must be a non-empty name of letters, digits, '.', '_' or '-', got {self.rdzv_id!r}"
            )

    @property
    def needed(self) -> bool:
        """More than one process (or restarts), and this is not yet one of them."""
        return (self.nproc_per_node > 1 or self.node_range[1] > 1 or self.max_restarts > 0) and not launched()

    def torchrun_args(self, log_dir: str, argv: list[str]) -> list[str]:
        args = [
            "--nproc-per-node",
            str(self.nproc_per_node),
            "--log-dir",
            log_dir,
            "--shutdown-timeout",
            str(SHUTDOWN_TIMEOUT_S),
            "--max-restarts",
            str(self.max_restarts),
        ]
        if self.nproc_per_node > 1:  # local ranks 1.. write to files; rank 0 to the terminal
            args += ["--redirects", ",".join(f"{r}:3" for r in range(1, self.nproc_per_node))]
        if self.rdzv_endpoint is None:
            args += ["--standalone"]
        else:
            low, high = self.node_range
            args += [
                "--nnodes",
                f"{low}:{high}",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                self.rdzv_endpoint,
                "--rdzv-id",
                self.rdzv_id,
            ]
            conf = [os.environ["PET_RDZV_CONF"]] if os.environ.get("PET_RDZV_CONF") else []
            if self.node_rank is not None:
                conf.append(f"is_host={int(self.node_rank == 0)}")
            if conf:
                args += ["--rdzv-conf", ",".join(conf)]
        return [*args, "--module", "cli", *argv]


def launched() -> bool:
    """This process was started by torchrun (zoo's hand-off, or by hand)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launch(argv: list[str], where: Launch) -> int:
    """Run ``python -m cli <argv>`` under ``torch.distributed.run``; return the exit code."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    _silence_torchrun_logs()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // where.nproc_per_node)))
    with tempfile.TemporaryDirectory(prefix="zoo-torchrun-") as logs:
        args = torchrun.get_args_parser().parse_args(where.torchrun_args(logs, argv))
        if where.node_range[1] > 1:  # the nodes meet before anything else shows
            print(
                f"waiting for {where.nnodes} nodes at {where.rdzv_endpoint} (rendezvous {where.rdzv_id}; "
                "torchrun's join timeout is 600 s)",
                file=sys.stderr,
            )
        try:
            torchrun.run(args)
        except SignalException as stop:  # every process stopped after its step; rank 0 said where
            return 128 + int(stop.sigval)
        except ChildFailedError as failed:
            return _report(failed, Path(logs))
        except RendezvousError as err:
            reason = type(err).__name__ + (f": {_first_line(err)}" if str(err).strip() else "")
            print(f"error: the rendezvous at {where.rdzv_endpoint or 'localhost'} failed ({reason}); "
                  "every node must run the same command with the same --nnodes, --rdzv-endpoint and --rdzv-id",
                  file=sys.stderr)  # fmt: skip
            return 1
    return 0


def _report(failed, logs: Path) -> int:
    """The exit code of the first failed process, and its error as one line, unless local rank 0
    wrote it to the terminal already: rank 0 failed first, or every process refused the same
    bad input (exit code 1, as :func:`cli.app.user_errors` exits)."""
    _, first = failed.get_first_failure()  # the others were stopped because of it
    code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # killed by a signal: 128 + its number
    rank0 = next((f for f in failed.failures.values() if f.local_rank == 0), None)
    said = first.local_rank == 0 or (rank0 is not None and rank0.exitcode == first.exitcode == 1)
    if not said:
        found = sorted(logs.glob(f"*/attempt_*/{first.local_rank}/stderr.log"))
        lines = found[-1].read_text(errors="replace").strip().splitlines() if found else []
        last = lines[-1].removeprefix("error: ") if lines else f"exit code {first.exitcode}"
        print(f"error: local rank {first.local_rank} failed: {last}", file=sys.stderr)
    return code


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _silence_torchrun_logs() -> None:
    """torchrun logs every step of its life at WARNING and above; zoo says what matters itself."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
