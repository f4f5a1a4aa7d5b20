"""The data for a model and a purpose: what `zoo train`, `eval`, `search`, `slice`, `export`,
`bench` and `convert` load, shaped for the model in one place.

``train`` loads with the run's options (sizes, augmentation, split seed) and the model is then
built for the data's classes and input size. ``evaluate`` and ``calibrate`` shape the data for a
model that exists: its input size or context length, and the split seed and evaluation crop its
file records (:func:`zoo.members.recorded`, top level or under the trainer's ``"train"``).
``calibrate`` turns the training split's augmentation off (statistics and activation ranges are
measured on plain inputs); ``evaluate`` also requires the model's classes.

Data is adapted to a model where that loses nothing (sized to its input, grey images repeated
on its three channels); where it cannot be, the message names the flag that gives other data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zoo.tokenizer import recorded_tokenizer_files
from zoo.weights import recorded

from .bundle import DataBundle, repeat_channels
from .data import BYTE_VOCAB, DataConfig, default_data, load_data

if TYPE_CHECKING:
    import zoo

PURPOSES = ("train", "evaluate", "calibrate")
FLAG = {"train": "--data", "evaluate": "--data", "calibrate": "--calibrate"}  # what gives other data


@dataclass(frozen=True)
class ModelInput:
    """What a model reads, the facts its data must fit (also for a model not built yet)."""

    name: str  # for messages: the architecture, or "the model"
    kind: str  # "image" or "tokens"
    input_size: tuple[int, int, int] | None = None  # images: (C, H, W)
    context_length: int | None = None  # byte models
    num_classes: int | None = None
    metadata: dict = field(default_factory=dict)  # the weights file's record

    @classmethod
    def of(cls, model: "zoo.ElasticModel") -> "ModelInput":
        image = model.input_kind == "image"
        return cls(
            model.arch,
            model.input_kind,
            tuple(model.pretrained_cfg["input_size"]) if image else None,
            None if image else model.context_length,
            model.num_classes,
            getattr(model, "zoo_metadata", None) or {},
        )


def data_for(
    model: "ModelInput | zoo.ElasticModel",
    purpose: str,
    spec: str | None = None,
    options: DataConfig | None = None,
    seed: int = 0,
) -> DataBundle:
    """The data ``model`` is trained, evaluated or calibrated on.

    ``spec``: the data; else the one the model's file records; else its family's default.
    ``train`` takes the run's ``options`` and ``seed``; the other purposes size the data for the
    model, with the split seed and evaluation crop recorded in its file.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown data purpose {purpose!r}; choose one of {', '.join(PURPOSES)}")
    model = model if isinstance(model, ModelInput) else ModelInput.of(model)
    flag = FLAG[purpose]
    _check_tokenizer(model)
    stored = recorded(model.metadata, "data") if spec is None else None
    spec = spec or stored or default_data(model.kind)
    try:
        bundle = _load(model, purpose, spec, options, seed)
    except FileNotFoundError as err:
        if stored is None:
            raise
        raise FileNotFoundError(
            f"{err} (the data the weights file records); pass {flag} DATA to use other data"
        ) from None
    grey = bundle.kind == model.kind == "image" and bundle.input_size[0] == 1 < model.input_size[0]
    if purpose != "train" and grey:
        bundle = repeat_channels(bundle, model.input_size[0])  # grey on equal channels: lossless
    _check_fits(model, bundle, spec, flag, classes=purpose == "evaluate", channels=purpose != "train")
    if purpose == "calibrate" and getattr(bundle.train, "augment", False):
        bundle.train.augment = False
    return bundle


def _load(model: ModelInput, purpose: str, spec: str, options: DataConfig | None, seed: int) -> DataBundle:
    tokenizer = recorded_tokenizer_files(model.metadata).get("tokenizer.json")
    if purpose == "train":
        options = options or DataConfig()
        sizes = dict(seq_len=options.seq_len, img_size=options.img_size, crop_pct=options.crop_pct)
        return load_data(spec, seed=seed, aa=options.aa, reprob=options.reprob, tokenizer=tokenizer, **sizes)
    config = recorded(model.metadata, "config") or {}
    seed = int(config.get("seed", 0))
    if model.kind == "tokens":
        return load_data(spec, seq_len=model.context_length, seed=seed, tokenizer=tokenizer)
    # sized to the model's input; a folder's evaluation crop as trained
    crop_pct = recorded(model.metadata, "crop_pct") if spec.startswith("folder:") else None
    return load_data(spec, seed=seed, img_size=model.input_size[-1], crop_pct=crop_pct)


def _check_tokenizer(model: ModelInput) -> None:
    """A token model reads bytes only if its vocabulary is the bytes; any other needs the
    tokenizer its file records."""
    if model.kind != "tokens" or model.num_classes in (None, BYTE_VOCAB):
        return
    if not recorded_tokenizer_files(model.metadata):
        raise ValueError(
            f"{model.name} predicts {model.num_classes} tokens but records no tokenizer to read text with; "
            "convert it from a transformers folder that has tokenizer.json"
        )


def _check_fits(model: ModelInput, bundle: DataBundle, spec: str, flag: str, classes: bool, channels: bool) -> None:
    if bundle.kind != model.kind:
        raise ValueError(
            f"{model.name} reads {model.kind}, but data {spec!r} holds {bundle.kind}; "
            f"pass {flag} DATA with {model.kind}"
        )
    if bundle.kind == "tokens" and model.num_classes is not None and bundle.num_classes > model.num_classes:
        raise ValueError(
            f"{model.name} predicts {model.num_classes} tokens, but its tokenizer gives {bundle.num_classes} ids"
        )
    if channels and bundle.kind == "image" and bundle.input_size[0] != model.input_size[0]:
        raise ValueError(
            f"{model.name} reads {model.input_size[0]}-channel images, but data {spec!r} has "
            f"{bundle.input_size[0]}-channel images; pass {flag} DATA with {model.input_size[0]}-channel images"
        )
    if classes and bundle.num_classes != model.num_classes:
        raise ValueError(
            f"{model.name} has {model.num_classes} classes, but data {spec!r} has {bundle.num_classes}; "
            f"pass {flag} DATA with {model.num_classes} classes"
        )
