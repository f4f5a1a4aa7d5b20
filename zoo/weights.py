"""Weights files: safetensors tensors plus a JSON header that rebuilds the model.

The header (safetensors metadata key ``"zoo"``) holds the architecture, its arguments, the
axes, the trained sub-networks and the caller's metadata (metrics, provenance). Loading needs
nothing but the file and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as to_safetensors

from .base import ElasticModel
from .catalogue import pretrained_file
from .fileio import atomic_path
from .header import WeightsFileError, read_header, weights_path
from .registry import create_uninitialized

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save(model: ElasticModel, path: str | os.PathLike, metadata: dict | None = None, dtype: str = "float32") -> Path:
    """Write ``model`` to ``path`` atomically. ``metadata`` defaults to the model's own
    (``model.zoo_metadata``: provenance, a language model's tokenizer), as in ``save_pretrained``;
    ``dtype`` stores floating tensors smaller."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    header = {
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "model_args": model.model_args,
        "axes": list(model.axes),
        "subnets": [s.to_dict() for s in model.members],
        "num_params": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "metadata": dict(getattr(model, "zoo_metadata", {}) if metadata is None else metadata),
    }
    tensors, held = {}, set()
    for name, t in model.state_dict().items():
        t = (t.to(_DTYPES[dtype]) if t.is_floating_point() else t).detach().cpu().contiguous()
        # a tensor two modules share (coat's shared position encodings) is written under each name
        # (safetensors refuses shared memory); loading fills the one tensor from both, equal
        storage = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if storage in held else t
        held.add(storage)
    data = to_safetensors(tensors, metadata={"zoo": json.dumps(header)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)  # Python's own write: a failure keeps its errno (safetensors' does not)
    return Path(path)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> ElasticModel:
    """Rebuild the model stored in ``path`` (a weights file, or a family folder written by
    ``zoo.save_pretrained``); its metadata is in ``model.zoo_metadata``."""
    header = read_header(path)
    path = weights_path(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsFileError(f"{path} is corrupt or truncated ({_first_line(err)})") from None
    try:  # shapes only (the meta device): a header's arguments allocate nothing before they match the tensors
        model = create_uninitialized(header["arch"], device="meta", **header["model_args"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, RuntimeError) as err:
        # the arguments come from the file: a wrong type or value fails wherever the family uses it
        raise WeightsFileError(f"{path}: its header does not describe a buildable model ({_first_line(err)})") from None
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise WeightsFileError(f"tensors in {path} do not match its header: {'; '.join(problems[:3])}{more}")
    model = model.to_empty(device="cpu")  # every tensor is loaded next
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()})
    model.zoo_metadata = header.get("metadata", {})
    mean, std = recorded(model.zoo_metadata, "mean"), recorded(model.zoo_metadata, "std")
    if (
        model.input_kind == "image" and mean and std and len(mean) == len(std) == model.in_chans
    ):  # what its inputs are normalised with
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(mean), "std": tuple(std)}
    return model.to(device)


def recorded(metadata: dict, key: str):
    """A value the training run or conversion recorded (data spec, labels, mean, std): at the
    top level of a weights file's metadata, or in the trainer's ``"train"`` record; None if absent."""
    if metadata.get(key) is not None:
        return metadata[key]
    train = metadata.get("train")
    return train.get(key) if isinstance(train, dict) else None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(weights_path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_path(arch: str) -> Path:
    """Where the shipped weights of ``arch`` live inside the installed ``weights`` package."""
    return pretrained_file(arch)


def load_pretrained(arch: str, path: str | os.PathLike | None = None, **kwargs) -> ElasticModel:
    """Load the shipped weights of ``arch`` (or ``path``, e.g. from timm's pretrained cfg);
    ``num_classes`` may differ (new classifier)."""
    path = Path(path) if path is not None else pretrained_file(arch)
    model = load(path)
    if model.arch != arch:
        raise WeightsFileError(f"{path} holds {model.arch} weights, not {arch}")
    num_classes = kwargs.pop("num_classes", None)
    conflicts = [k for k, v in kwargs.items() if model.model_args.get(k, v) != v]
    if conflicts:
        raise ValueError(
            f"pretrained {arch} was trained with {', '.join(f'{k}={model.model_args[k]!r}' for k in conflicts)}"
        )
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
