"""A family as a timm-compatible folder: timm's Hub layout, ``config.json`` beside
``model.safetensors``.

    zoo.save_pretrained(family, "my-family")
    model = timm.create_model("local-dir:my-family", pretrained=True)   # after `import zoo`
    same = zoo.load("my-family")

``config.json`` is what timm's ``save_for_hf`` writes (``architecture``, ``num_classes``,
``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``) plus zoo's own record
under ``"zoo"``: the member fields, the trained members and their metrics. timm's
``local-dir:`` (and ``hf-hub:``, once the folder is uploaded with the hub's usual client) reads
the config, calls zoo's registered entrypoint with ``model_args`` and, with
``pretrained=True``, zoo loads ``model.safetensors``, which holds zoo's full header too, so the
weights alone rebuild the family. Without ``pretrained=True`` timm builds the architecture with
fresh weights, as for any timm model.

Each file is written atomically, the weights first: a crash between the two leaves the new
weights beside the old config, which loading refuses (they must describe the same model)
rather than mixing.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from .base import ElasticModel
from .fileio import atomic_path
from .header import CONFIG_NAME, WEIGHTS_NAME
from .members import recorded
from .weights import FORMAT_VERSION, save


def hub_config(model: ElasticModel, metadata: dict) -> dict:
    """The ``config.json`` of a family (timm's fields, then zoo's record)."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("architecture", "file", "tag", "source")}
    for key in ("mean", "std"):
        if recorded(metadata, key) is not None:
            cfg[key] = list(recorded(metadata, key))
    if model.input_kind == "image":
        cfg.setdefault("interpolation", "bilinear")
        cfg.setdefault("crop_pct", 1.0)
        cfg["fixed_input_size"] = model.fixed_input_size  # a ViT's position embedding fixes it
    cfg["num_classes"] = model.num_classes
    config = {
        "architecture": model.arch,
        "num_classes": model.num_classes,
        "num_features": int(model.num_features) if hasattr(model, "num_features") else None,
    }
    pool = _default_global_pool(model)
    if pool:
        config["global_pool"] = pool
    labels = recorded(metadata, "labels")
    if labels:
        config["label_names"] = list(labels)
    config["model_args"] = model.model_args
    config["pretrained_cfg"] = cfg
    config["zoo"] = {
        "format_version": FORMAT_VERSION,
        "axes": list(model.axes),
        "members": [s.to_dict() for s in model.members],
        "metrics": metadata.get("metrics") or [],
        "converted_from": metadata.get("converted_from"),
    }
    return json.loads(json.dumps(config))  # plain JSON types (tuples become lists)


def _default_global_pool(model: ElasticModel) -> str | None:
    """The family's default pooling (its constructor's ``global_pool``); None for a family without."""
    parameter = inspect.signature(type(model)).parameters.get("global_pool")
    return None if parameter is None else parameter.default


def save_pretrained(model: ElasticModel, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model`` into ``directory`` in timm's Hub layout (see the module doc). ``metadata``
    defaults to the model's own (``model.zoo_metadata``: metrics, provenance)."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_pretrained writes a folder")
    metadata = dict(getattr(model, "zoo_metadata", {}) if metadata is None else metadata)
    config = hub_config(model, metadata)
    save(model, folder / WEIGHTS_NAME, metadata=metadata)
    with atomic_path(folder / CONFIG_NAME) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
    return folder
