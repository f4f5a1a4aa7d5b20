"""Validation metrics per member: accuracy for classifiers, bits per byte for byte models.

Bits per byte is the mean next-byte cross-entropy in nats divided by ln 2: the code length a
model needs per byte of validation text. ``loss`` is always the mean cross-entropy in nats
(per image, or per byte).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

import zoo
from zoo import Subnet


EVAL_IMAGES = 256  # images per evaluation batch
# Byte positions per evaluation batch (32 windows of 256): a batch's activations then stay in
# the CPU's caches; 65536 positions ran 15-20% slower (benchmarks/bench_eval.py).
EVAL_TOKENS = 2**13


def default_batch_size(model: zoo.ElasticModel) -> int:
    """Evaluation batch: 256 images, or as many windows as make 8192 bytes."""
    return EVAL_IMAGES if model.input_kind == "image" else max(1, EVAL_TOKENS // model.context_length)


def metric_name(model: zoo.ElasticModel) -> str:
    return "bits_per_byte" if model.input_kind == "tokens" else "accuracy"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: zoo.ElasticModel,
    dataset: Dataset,
    subnets: Sequence[Subnet],
    batch_size: int = 256,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """``[{"subnet": {...}, "loss": .., "accuracy" | "bits_per_byte": ..}]``, one per member.

    Runs on the model's device in eval mode over the first ``limit`` items of ``dataset`` (all
    by default), each batch through every member; the model's mode and member are restored.
    ``progress(done, total)`` is called after every forward pass, counting items times members.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch size and limit must be at least 1, got {batch_size} and {limit}")
    if len(dataset) == 0:
        raise ValueError("the validation split is empty")
    device = next(model.parameters()).device
    data = dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))
    loss_sums = torch.zeros(len(subnets), dtype=torch.float64)
    correct = torch.zeros(len(subnets), dtype=torch.int64)
    count, done, total = 0, 0, len(data) * len(subnets)
    was_training, previous = model.training, model.active_subnet
    model.eval()
    try:
        for inputs, targets in DataLoader(data, batch_size=batch_size, shuffle=False):
            inputs, targets = inputs.to(device), targets.to(device).flatten()
            count += targets.numel()
            for i, subnet in enumerate(subnets):
                model.set_subnet(subnet)
                with autocast(device):
                    logits = model(inputs)
                logits = logits.float().flatten(0, -2)
                loss_sums[i] += F.cross_entropy(logits, targets, reduction="sum").double().cpu()
                correct[i] += (logits.argmax(-1) == targets).sum().cpu()
                done += len(inputs)
                if progress is not None:
                    progress(done, total)
    finally:
        model.set_subnet(previous)
        model.train(was_training)
    results = []
    for i, subnet in enumerate(subnets):
        loss = float(loss_sums[i]) / count
        metric = {"bits_per_byte": loss / math.log(2)} if model.input_kind == "tokens" else {"accuracy": int(correct[i]) / count}
        results.append({"subnet": subnet.to_dict(), **metric, "loss": loss})
    return results


def default_members(model: zoo.ElasticModel) -> list[Subnet]:
    """The members a weights file was trained for: those with recorded metrics, else its grid."""
    recorded = getattr(model, "zoo_metadata", {}).get("metrics") or []
    members = [Subnet.from_dict(r["subnet"]) for r in recorded if isinstance(r, dict) and "subnet" in r]
    return members or list(model.subnets)


def choose_members(model: zoo.ElasticModel, widths: Sequence[float] | None, ranks: Sequence[float] | None) -> list[Subnet]:
    """The product of the given widths and ranks (each defaulting to the trained members'
    values), validated against the model's space; nothing given: the trained members."""
    members = default_members(model)
    if not widths and not ranks:
        return members
    widths = list(widths or sorted({s.width for s in members}))
    rank_values = list(ranks) if ranks else sorted({s.rank for s in members}, key=lambda r: r or 0.0)
    chosen = sorted({model.resolve_subnet(w, r) for w in widths for r in rank_values}, key=lambda s: (s.width, s.rank or 0.0))
    with zoo.subnet(model):  # validates each (batch-norm statistics must exist), then restores
        for subnet in chosen:
            model.set_subnet(subnet)
    return chosen


def data_for(model: zoo.ElasticModel, spec: str | None):
    """The validation data a model is evaluated on: ``spec``, else the one recorded in its
    file (same split seed and sizes as in training), else its family's default."""
    from .data import default_data, load_data

    train_info = getattr(model, "zoo_metadata", {}).get("train") or {}
    config = train_info.get("config") or {}
    spec = spec or train_info.get("data") or default_data(model.input_kind)
    seed = int(config.get("seed", 0))
    if model.input_kind == "tokens":
        bundle = load_data(spec, seq_len=model.context_length, seed=seed)
    else:
        bundle = load_data(spec, seed=seed, img_size=model.pretrained_cfg["input_size"][-1])
    if bundle.kind != model.input_kind:
        raise ValueError(f"{model.arch} reads {model.input_kind}, but data {spec!r} holds {bundle.kind}")
    if bundle.kind == "image" and bundle.input_size[0] != model.in_chans:
        raise ValueError(f"{model.arch} reads {model.in_chans}-channel images, but data {spec!r} has {bundle.input_size[0]} channels")
    if bundle.num_classes != model.num_classes:
        raise ValueError(f"{model.arch} has {model.num_classes} classes, but data {spec!r} has {bundle.num_classes}")
    return bundle
