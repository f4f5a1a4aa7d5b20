"""Validation metrics per member: accuracy for classifiers, bits per byte for language models.

Bits per byte is the code length a model needs per byte of validation text: the total
next-token cross-entropy in nats over the text, divided by ln 2 and by the UTF-8 bytes the
target tokens cover (for a byte model, one per token). So byte and token models compare.
``loss`` is always the mean cross-entropy in nats per item: per image, per byte, or per token.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

import zoo
from zoo import Member

from .workers import loader, running

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
    members: Sequence[Member],
    batch_size: int = 256,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 0,
) -> list[dict]:
    """``[{"subnet": {...}, "loss": .., "accuracy" | "bits_per_byte": ..}]``, one per member.

    Runs on the model's device in eval mode over the first ``limit`` items of ``dataset`` (all
    by default), each batch through every member; the model's mode and member are restored.
    ``progress(done, total)`` is called after every forward pass, counting items times members.
    ``workers``: loader processes that read (and decode) the items.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch size and limit must be at least 1, got {batch_size} and {limit}")
    if len(dataset) == 0:
        raise ValueError("the validation split is empty")
    device = next(model.parameters()).device
    data = dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))
    loss_sums = torch.zeros(len(members), dtype=torch.float64)
    correct = torch.zeros(len(members), dtype=torch.int64)
    count, done, total = 0, 0, len(data) * len(members)
    was_training, previous = model.training, model.active_member
    model.eval()
    try:
        with running(loader(data, batch_size=batch_size, shuffle=False, num_workers=workers)) as batches:
            for inputs, targets in batches:
                inputs, targets = inputs.to(device), targets.to(device).flatten()
                count += targets.numel()
                for i, member in enumerate(members):
                    model.set_member(member)
                    with autocast(device):
                        logits = model(inputs)
                    logits = logits.float().flatten(0, -2)
                    loss_sums[i] += F.cross_entropy(logits, targets, reduction="sum").double().cpu()
                    correct[i] += (logits.argmax(-1) == targets).sum().cpu()
                    done += len(inputs)
                    if progress is not None:
                        progress(done, total)
    finally:
        model.set_member(previous, for_training=True)
        model.train(was_training)
    text_bytes = dataset.target_bytes(len(data)) if hasattr(dataset, "target_bytes") else count
    results = []
    for i, member in enumerate(members):
        loss = float(loss_sums[i]) / count
        metric = (
            {"bits_per_byte": float(loss_sums[i]) / math.log(2) / text_bytes}
            if model.input_kind == "tokens"
            else {"accuracy": int(correct[i]) / count}
        )
        results.append({"subnet": member.to_dict(), **metric, "loss": loss})
    return results


def calibration_batches(bundle, batch_size: int = 64, limit: int = 8) -> list[torch.Tensor]:
    """Batch-norm recalibration inputs: the first ``limit`` batches of the training split,
    without augmentation (what an untrained member's statistics are estimated from)."""
    from .data import batches

    train = bundle.train
    if getattr(train, "augment", False):
        train = copy.copy(train)
        train.augment = False
    return list(batches(train, batch_size, limit=limit))


class MemberScorer:
    """The metric of one member on a fixed validation subset (for ``zoo search``).

    A batch-norm member without statistics is recalibrated first on ``calibration`` batches
    (and keeps them, so its slice and export need no more data).
    """

    def __init__(self, model: zoo.ElasticModel, bundle, limit: int | None = None, batch_size: int | None = None):
        self.model, self.val, self.limit = model, bundle.val, limit
        self.batch_size = batch_size or default_batch_size(model)
        self.calibration = calibration_batches(bundle) if model.uses_batchnorm else []
        self.metric = metric_name(model)

    def prepare(self, member: Member) -> None:
        """Give ``member`` batch-norm statistics if it has none (slicing needs them)."""
        from zoo.members import calibrate_members

        calibrate_members(self.model, [member], self.calibration)

    def __call__(self, member: Member) -> float:
        self.prepare(member)
        return evaluate(self.model, self.val, [member], self.batch_size, self.limit)[0][self.metric]
