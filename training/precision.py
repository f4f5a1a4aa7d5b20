"""Mixed precision of the training step: ``--amp bf16|fp16|none``.

bf16 (the default on CUDA) needs nothing but autocast: it has float32's range, so gradients
neither overflow nor underflow. fp16 has a narrow range, so its loss is scaled by torch's
``GradScaler``: gradients are computed scaled, unscaled before clipping and the step, and a
step whose gradients overflowed is skipped while the scale shrinks. Parameters, gradients and
optimizer state stay float32 in every mode; only the forward's matrix products run in the low
precision.

The masked step (:func:`training.masking.masked_step`) wraps the scaler's own step, so a
skipped step moves nothing and a taken one is masked bit for bit as in full precision. An
update policy that reads gradient values to choose its perturbation (extragradient's
``-η·g(x)``) reads them unscaled (:meth:`Precision.unscaled`); the policies' masks (meProp's
top-k) and SAM's normalised direction do not depend on the scale.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

from .masking import Masks, masked_step

AMP = ("bf16", "fp16", "none")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """``--amp``: by default bf16 on CUDA, none elsewhere (CPU autocast is slower than float32
    for most layers; ask for it with ``--amp bf16``)."""
    if amp is None:
        return "bf16" if device.type == "cuda" else "none"
    if amp not in AMP:
        raise ValueError(f"--amp must be one of {', '.join(AMP)}, got {amp!r}")
    return amp


class Precision:
    """Autocast, loss scaling and the (masked) optimizer step of one run."""

    def __init__(self, amp: str, device: torch.device):
        self.amp, self.device = amp, device
        self.dtype = _DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return (
            torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        )

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscaled(
        self, gradient: Callable[[], list[torch.Tensor]], params: Iterable[nn.Parameter]
    ) -> Callable[[], list[torch.Tensor]]:
        """``gradient`` with ``.grad`` divided by the loss scale afterwards: the true ``g(x)``
        for a policy's perturbation (an overflow stays inf, and the step it leads to is skipped)."""
        if self.scaler is None:
            return gradient
        params = list(params)

        def run() -> list[torch.Tensor]:
            losses = gradient()
            inverse = 1.0 / self.scaler.get_scale()
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inverse)
            return losses

        return run

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        masks: Masks | None,
        clip_grad: float | None,
        params: Iterable[nn.Parameter],
    ) -> None:
        """Unscale (fp16), clip, and take the masked step (skipped by the scaler after an overflow)."""
        if self.scaler is None:
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            masked_step(optimizer, masks)
            return
        self.scaler.unscale_(optimizer)
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        masked_step(optimizer, masks, step=lambda: self.scaler.step(optimizer))
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
