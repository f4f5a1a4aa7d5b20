"""The zoo header of a weights file, read straight from the safetensors layout.

A safetensors file is an 8-byte little-endian header length, a JSON header (every tensor's
dtype, shape and byte range, plus string metadata) and the tensor bytes. Reading the header
needs no tensor library, so `zoo info` answers without importing torch; the module imports
only the standard library (the CLI loads it without running ``zoo/__init__.py``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .schema import HUB_CONFIG, SAFETENSORS_HEADER, ZOO_HEADER, check

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
# A family folder (zoo.save_pretrained): timm's Hub layout.
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class WeightsFileError(ValueError):
    """A weights file that is missing, corrupt, foreign, or inconsistent with its header."""


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (so that a
    truncated file is reported without reading its tensors)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"no such weights file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise WeightsFileError(f"{path} is not a readable safetensors file (no valid header length)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsFileError(f"{path} is not a readable safetensors file (its header is not JSON)") from None
    check(header, SAFETENSORS_HEADER, f"{path} is not a readable safetensors file (its header)", WeightsFileError)
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise WeightsFileError(
            f"{path} is not a readable safetensors file "
            f"(truncated: {size:,} bytes, its header describes {8 + length + end:,})"
        )
    return header


def weights_path(path: str | os.PathLike) -> Path:
    """The weights file itself, or a family folder's ``model.safetensors``."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / WEIGHTS_NAME).is_file():
        raise WeightsFileError(f"{path} is a folder without {WEIGHTS_NAME}")
    return path / WEIGHTS_NAME


def read_header(path: str | os.PathLike) -> dict:
    """The zoo header of a weights file (or a family folder's), without reading its tensors.
    A folder's ``config.json`` must describe the same model as its weights."""
    header = _zoo_header(weights_path(path))
    config = Path(path) / CONFIG_NAME
    if Path(path).is_dir() and config.is_file():
        try:
            described = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsFileError(f"{config} is not a timm model config (not JSON)") from None
        check(described, HUB_CONFIG, f"{config} is not a timm model config", WeightsFileError)
        arch, args = described["architecture"], described.get("model_args", {})
        if (arch, args) != (header["arch"], header["model_args"]):
            raise WeightsFileError(
                f"{config} describes {arch} with other arguments than {Path(path) / WEIGHTS_NAME} "
                f"({header['arch']}); write the folder again"
            )
    return header


def _zoo_header(path: Path) -> dict:
    meta = safetensors_header(path).get("__metadata__") or {}
    if not isinstance(meta, dict) or "zoo" not in meta:
        raise WeightsFileError(f"{path} is a safetensors file but not a zoo weights file (no zoo header)")
    try:
        header = json.loads(meta["zoo"])
    except json.JSONDecodeError:
        raise WeightsFileError(f"{path} has a corrupt zoo header (not JSON)") from None
    return check(header, ZOO_HEADER, f"{path} has a corrupt zoo header", WeightsFileError)
