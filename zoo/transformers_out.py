"""A sliced language-model member as a standard transformers folder.

    sliced, folder = zoo.slice_to_transformers("family.safetensors", "small/", width=0.5)   # zoo slice --out small/
    zoo.save_transformers(member_model, "small/", metadata=member_model.zoo_metadata)      # a sliced model
    transformers.AutoModelForCausalLM.from_pretrained("small/")

The folder holds ``config.json`` (the source model's config with the member's sizes, from the
family's ``transformers_parts``), ``model.safetensors`` (float32, transformers' tensor names)
and the tokenizer files the family records (:mod:`zoo.tokenizer`). It is written into a
temporary folder beside the target and renamed into place, so it appears whole or not at all;
an existing folder must be empty. Nothing here imports transformers: the folder is plain JSON
and safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .fileio import WriteError
from .members import SlicedMember, WeightsSource
from .tokenizer import write_tokenizer_files

CONFIG_KEY = "transformers_config"  # the converted model's config.json, in the family's metadata


@dataclass
class TransformersFolder:
    """What :func:`save_transformers` wrote."""

    path: Path
    architecture: str
    config: dict
    tokenizer_files: list[str]
    note: str | None  # how the member was written, where the folder differs from a plain copy


def eos_token_ids(metadata: dict) -> list[int]:
    """The end-of-sequence token ids of the converted model's config (none for a family built in
    zoo): where generation stops, as transformers' ``generate`` stops."""
    config = metadata.get(CONFIG_KEY) if isinstance(metadata, dict) else None
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


def writes_transformers(model: nn.Module) -> bool:
    """Whether the model's family can be written as a transformers folder."""
    return hasattr(model, "transformers_parts")


def check_folder(folder: str | os.PathLike) -> Path:
    """A folder to write into: new, or existing and empty (a one-line error otherwise)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; a transformers model is written as a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"the folder {folder} is not empty; give a new or empty folder for the transformers model")
    return folder


def save_transformers(model: nn.Module, folder: str | os.PathLike, metadata: dict | None = None) -> TransformersFolder:
    """Write the sliced member ``model`` as a transformers folder (see the module docstring);
    ``metadata``: its ``zoo_metadata`` (the source's config and the tokenizer files)."""
    if not writes_transformers(model):
        raise ValueError(
            f"{model.arch} is not a language model of a transformers layout: it slices to zoo's format only "
            "(--out FILE.safetensors)"
        )
    folder = check_folder(folder)
    metadata = metadata or {}
    source = metadata.get(CONFIG_KEY)
    config, tensors, note = model.transformers_parts(source if isinstance(source, dict) else None)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    work = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        work.mkdir(parents=True)
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        written = [p.name for p in write_tokenizer_files(metadata, work)]
        with contextlib.suppress(FileNotFoundError):
            folder.rmdir()  # empty (checked above): the rename takes its place
        os.replace(work, folder)
    except OSError as err:
        raise WriteError(folder, err) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return TransformersFolder(folder, config["architectures"][0], config, written, note)


def slice_to_transformers(
    path: str | os.PathLike, out: str | os.PathLike, member=None, rank: float | None = None
) -> tuple[SlicedMember, TransformersFolder]:
    """Slice one member of the family in ``path`` and write it as a transformers folder ``out``
    (what ``zoo slice --out DIR`` does; a ``.safetensors`` path gets :func:`zoo.slice_file`)."""
    check_folder(out)  # before loading: a wrong output answers at once, and nothing is written
    source = WeightsSource.open(path)
    if not writes_transformers(source.model):
        raise ValueError(
            f"{source.model.arch} is not a language model of a transformers layout: a folder output is a "
            "transformers model folder; give a .safetensors file for zoo's format"
        )
    sliced = source.member(member, rank)
    return sliced, save_transformers(sliced.model, out, sliced.metadata)
