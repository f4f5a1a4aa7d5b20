"""Counting a model's FLOPs with PyTorch's own flop counter (no extra dependency)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .base import ElasticModel


@torch.no_grad()
def count_flops(model: ElasticModel, batch_size: int = 1) -> int:
    """Forward FLOPs (multiply and add counted separately) for one example input batch.

    Counts the active sub-network of an elastic model, which equals its sliced twin's count:
    slicing adds no matmul work.
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(model.example_input(batch_size))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
