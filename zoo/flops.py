"""Counting a model's FLOPs with PyTorch's own flop counter (no extra dependency)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .base import ElasticModel


def count_flops(model: ElasticModel, member=None, *, batch_size: int = 1) -> int:
    """Forward FLOPs (multiply and add counted separately) for one example input batch.

    Counts ``member`` (the active one if None) of an elastic model, which equals its sliced
    twin's count: slicing adds no matmul work. Needs no batch-norm statistics.
    """
    was_training, previous = model.training, model.active_member
    chosen = previous if member is None else model.resolve_member(member)
    # A batch-norm member without statistics runs on batch statistics (train mode), which need
    # two examples; the count is linear in the batch.
    uncalibrated = model.needs_calibration(chosen)
    batch = max(2, batch_size) if uncalibrated else batch_size
    model.set_member(chosen, for_training=True)
    model.train(uncalibrated)
    try:
        # with gradients on: the counter's module tracker hooks every input that requires grad,
        # and a view of a parameter made without them (CaiT's expanded class token) has none to hook
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            model(model.example_input(batch))
    finally:
        model.train(was_training)
        model.set_member(previous, for_training=True)
    return int(counter.get_total_flops()) * batch_size // batch
