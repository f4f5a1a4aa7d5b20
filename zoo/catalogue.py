"""The catalogue's facts as plain data: what `zoo list`, `zoo info` and name checks need.

Building a model to learn its family or parameter count means importing torch and timm
(seconds); these facts never change at run time, so they are written down here and
``tests/test_catalogue.py`` checks them against the real models and the shipped files. The
module imports only the standard library: the CLI loads it without running
``zoo/__init__.py`` (see ``cli.common.zoo_module``).
"""

from __future__ import annotations

import difflib
import fnmatch
from importlib import resources
from pathlib import Path

# name -> family, input kind, whether it has batch norm (members need statistics), the member
# axes (dense, and built with low_rank=True), the groups a member chooses per (stages or
# blocks), and parameter counts at the default arguments, dense and low-rank (rank 1.0).
_CNN = {"input": "image", "batchnorm": True, "axes": ("width", "depth"), "axes_low_rank": ("width", "rank", "depth")}
_TRANSFORMER = {
    "batchnorm": False,
    "axes": ("heads", "mlp", "blocks"),
    "axes_low_rank": ("heads", "mlp", "rank", "blocks"),
}
MODELS: dict[str, dict] = {
    "slim_gpt_nano": {
        "family": "gpt",
        "input": "tokens",
        **_TRANSFORMER,
        "groups": (4, "block"),
        "params": 891_648,
        "params_low_rank": 1_153_792,
    },
    "slim_gpt2": {
        "family": "causal_lm",
        "input": "tokens",
        **_TRANSFORMER,
        "groups": (4, "block"),
        "groups_arg": "num_layers",  # a layout: its size is the converted model's
        "params": 858_880,
        "params_low_rank": 1_252_096,
    },
    "slim_gpt_small": {
        "family": "gpt",
        "input": "tokens",
        **_TRANSFORMER,
        "groups": (6, "block"),
        "params": 10_942_464,
        "params_low_rank": 14_481_408,
    },
    "slim_llama": {
        "family": "causal_lm",
        "input": "tokens",
        **_TRANSFORMER,
        "groups": (4, "block"),
        "groups_arg": "num_layers",  # a layout: its size is the converted model's
        "params": 803_968,
        "params_low_rank": 1_164_416,
    },
    "slim_mobilenetv2": {
        "family": "mobilenetv2",
        **_CNN,
        "groups": (7, "stage"),
        "params": 3_504_872,
        "params_low_rank": 3_960_296,
    },
    "slim_resnet18": {
        "family": "resnet",
        **_CNN,
        "groups": (4, "stage"),
        "params": 11_689_512,
        "params_low_rank": 13_168_168,
    },
    "slim_resnet20": {
        "family": "resnet",
        **_CNN,
        "groups": (3, "stage"),
        "params": 272_474,
        "params_low_rank": 306_010,
    },
    "slim_resnet34": {
        "family": "resnet",
        **_CNN,
        "groups": (4, "stage"),
        "params": 21_797_672,
        "params_low_rank": 24_398_632,
    },
    "slim_resnet50": {
        "family": "resnet",
        **_CNN,
        "groups": (4, "stage"),
        "params": 25_557_032,
        "params_low_rank": 30_709_800,
    },
    "slim_resnet56": {
        "family": "resnet",
        **_CNN,
        "groups": (3, "stage"),
        "params": 855_770,
        "params_low_rank": 953_818,
    },
    "slim_resnet101": {
        "family": "resnet",
        **_CNN,
        "groups": (4, "stage"),
        "params": 44_549_160,
        "params_low_rank": 53_044_264,
    },
    "slim_resnet152": {
        "family": "resnet",
        **_CNN,
        "groups": (4, "stage"),
        "params": 60_192_808,
        "params_low_rank": 71_440_424,
    },
    "slim_vit_base": {
        "family": "vit",
        "input": "image",
        **_TRANSFORMER,
        "groups": (12, "block"),
        "params": 86_567_656,
        "params_low_rank": 114_879_208,
    },
    "slim_vit_large": {
        "family": "vit",
        "input": "image",
        **_TRANSFORMER,
        "groups": (24, "block"),
        "params": 304_326_632,
        "params_low_rank": 404_989_928,
    },
    "slim_vit_small": {
        "family": "vit",
        "input": "image",
        **_TRANSFORMER,
        "groups": (12, "block"),
        "params": 22_050_664,
        "params_low_rank": 29_128_552,
    },
    "timm_graph": {  # any timm model (timm_model=...); the facts are of its default, resnet10t
        "family": "graph",
        "input": "image",
        "batchnorm": True,
        "axes": ("width",),
        "axes_low_rank": None,  # dense only
        "groups": (10, "group"),
        "groups_arg": "groups",  # the channel groups of the converted model
        "params": 5_435_488,
        "params_low_rank": None,
    },
    "slim_vit_tiny": {
        "family": "vit",
        "input": "image",
        **_TRANSFORMER,
        "groups": (12, "block"),
        "params": 5_717_416,
        "params_low_rank": 7_486_888,
    },
}


def axes(name: str, low_rank: bool) -> tuple[str, ...]:
    return MODELS[name]["axes_low_rank" if low_rank else "axes"] or MODELS[name]["axes"]


def space(name: str, low_rank: bool, model_args: dict | None = None) -> str:
    """The member space in the words of ``ElasticModel.describe_space``, e.g. ``3 stages with
    width, depth per stage``; ``model_args`` (a file's) give the count where an argument sets it
    (``groups_arg``: a converted language model's layers)."""
    count, group = MODELS[name]["groups"]
    count = (model_args or {}).get(MODELS[name].get("groups_arg", ""), count)
    count = len(count) if isinstance(count, list) else count  # a list of the groups themselves
    return f"{count} {group}s with {', '.join(axes(name, low_rank))} per {group}"


# Shipped weights (weights/NAME.safetensors), named in timm's style ``NAME.TAG`` where the tag
# is the data they were trained on. The input facts are what timm's pretrained cfg reports.
PRETRAINED: dict[str, dict] = {
    "slim_gpt_nano": {"tag": "stdlib", "num_classes": 256, "input_size": (256,), "mean": None, "std": None},
    "slim_resnet20": {"tag": "digits", "num_classes": 10, "input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)},
    "slim_vit_tiny": {"tag": "digits", "num_classes": 10, "input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)},
}


def names(pattern: str | None = None) -> list[str]:
    """Catalogue names, sorted; ``pattern`` is an fnmatch filter like timm's."""
    return [n for n in sorted(MODELS) if pattern is None or fnmatch.fnmatch(n, pattern)]


def unknown_model(name: str, known: list[str] | None = None) -> str:
    """The one-line error for a name that is not in the catalogue, with the closest names."""
    known = sorted(MODELS) if known is None else known
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:  # every name starts with "slim_": keep only the matches about as close as the best
        best = difflib.SequenceMatcher(None, name, close[0]).ratio()
        close = [c for c in close if difflib.SequenceMatcher(None, name, c).ratio() >= best - 0.03]
    hint = f" did you mean {' or '.join(filter(None, [', '.join(close[:-1]), close[-1]]))}?" if close else ""
    return f"unknown model {name!r};{hint} known: {', '.join(known)}"


def check_name(name: str) -> str:
    if name not in MODELS:
        raise ValueError(unknown_model(name))
    return name


def shipped_path(name: str) -> Path:
    """Where the shipped weights of ``name`` live inside the installed ``weights`` package."""
    return Path(str(resources.files("weights") / f"{name}.safetensors"))


def pretrained_file(name: str) -> Path:
    """The shipped weights of ``name`` (ValueError for an unknown name or one not shipped)."""
    check_name(name)
    path = shipped_path(name)
    if name not in PRETRAINED or not path.is_file():
        raise ValueError(f"no pretrained weights are shipped for {name}; shipped: {', '.join(sorted(PRETRAINED))}")
    return path
