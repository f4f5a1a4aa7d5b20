"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, optimizer and scheduler states, the step, the strategy's
generator, every global random state (torch, CUDA, Python, NumPy) and the evaluation history.
The data order needs no state of its own: it is a function of (seed, epoch, step in epoch).
It is written with ``torch.save`` through :func:`zoo.fileio.atomic_path`, so a run killed at
any moment leaves the previous checkpoint intact, and read with
``torch.load(weights_only=True)``, so loading one never runs code: every value in it is a
tensor or plain Python data.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from zoo.fileio import atomic_path
from zoo.schema import CHECKPOINT, check

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a failed write keeps its errno
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint; a missing, foreign or damaged file is a one-line ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is not a readable zoo checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a zoo training checkpoint (format version {FORMAT_VERSION})")
    return check(state, CHECKPOINT, f"{path} is a damaged zoo training checkpoint")


# What restoring a checkpoint's states raises when they do not fit the run (torch's
# load_state_dict, the generators' set_state): a damaged checkpoint, or another run's.
RESTORE_ERRORS = (RuntimeError, KeyError, TypeError, IndexError, ValueError)


def unfit_checkpoint(path: Path, err: Exception) -> ValueError:
    """The one-line error for a checkpoint whose states do not fit the run restoring them."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # load_state_dict: the first problem
    return ValueError(f"{path} does not fit this run ({reason[:200]})")


def rng_states() -> dict:
    """Every global random state, as tensors and plain Python values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy = states["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
