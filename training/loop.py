"""The loop's parts of a training configuration: the optimizer and its schedule, and the loop itself
(length, evaluation and checkpoint intervals, precision, accumulation, EMA, compilation).

Optimizers and schedule come from timm (``create_optimizer_v2``: SGD with momentum, optionally
Nesterov, or AdamW, no weight decay on biases and norms; ``CosineLRScheduler`` with linear
warmup, driven per step). The schedule is a pure function of the step, so resuming needs only
the step. ``None`` means "the default for the model's input kind" (``KIND_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .compiled import check_backend
from .flags import at_least_one, non_negative, require

DEFAULT_EMA_DECAY = 0.9998

# Defaults that depend on what the model reads: (images, byte tokens).
KIND_DEFAULTS = {
    "image": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "batch_size": 128, "steps": 600, "eval_limit": 2048},
    "tokens": {
        "optimizer": "adamw",
        "lr": 3e-3,
        "weight_decay": 0.1,
        "batch_size": 16,
        "steps": 1000,
        "eval_limit": 128,
    },
}


def _fill(config, input_kind: str, **more):
    """``config`` with its ``None`` fields that have a kind default filled in (and ``more``)."""
    names = {f.name for f in dataclasses.fields(config)}
    defaults = KIND_DEFAULTS[input_kind]
    fills = {k: v for k, v in defaults.items() if k in names and k != "steps" and getattr(config, k) is None}
    return dataclasses.replace(config, **fills, **more)


@dataclass
class OptimConfig:
    """The optimizer, its learning-rate schedule and the loss (``zoo train``'s optimization flags)."""

    optimizer: str | None = None  # sgd | adamw
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    warmup_steps: int | None = None  # default: 5% of the steps
    clip_grad: float | None = None
    label_smoothing: float = 0.0

    def check(self) -> None:
        if self.optimizer not in (None, "sgd", "adamw"):
            raise ValueError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        for name in ("lr", "clip_grad"):
            require(name, getattr(self, name), lambda v: v > 0, "positive")
        non_negative(self, "weight_decay", "warmup_steps", "momentum")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")

    def resolved(self, input_kind: str) -> OptimConfig:
        return _fill(self, input_kind)

    def create(self, model: torch.nn.Module, total_steps: int):
        """timm's optimizer and per-step cosine schedule (with warmup) for ``model``."""
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        if self.optimizer == "sgd":  # timm: "sgd" is Nesterov SGD, "momentum" is classical momentum
            name = "sgd" if self.nesterov else "momentum"
            optimizer = create_optimizer_v2(
                model, name, lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum
            )
        else:
            optimizer = create_optimizer_v2(model, "adamw", lr=self.lr, weight_decay=self.weight_decay)
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - self.warmup_steps),
            warmup_t=self.warmup_steps,
            warmup_lr_init=self.lr * 0.01,
            warmup_prefix=True,
            t_in_epochs=False,  # driven per step by step_update
        )
        return optimizer, scheduler

    def hard_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on labels; on mixup's soft targets (smoothing already in them), timm's
        ``SoftTargetCrossEntropy``."""
        if targets.is_floating_point():
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()(logits.float(), targets)
        flat = logits.float().flatten(0, -2)
        return F.cross_entropy(flat, targets.flatten(), label_smoothing=self.label_smoothing)


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's soft outputs (KL up to the teacher's fixed entropy)."""
    soft = F.softmax(teacher.float().flatten(0, -2), dim=-1)
    return -(soft * F.log_softmax(logits.float().flatten(0, -2), dim=-1)).sum(-1).mean()


@dataclass
class LoopConfig:
    """The loop: its length and batch, evaluation and checkpoints, and how a step runs."""

    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None  # the global batch, split over processes
    log_alignment: int | None = None  # every N steps: cos(m ⊙ g(x + δ), g(x)) on a fixed batch
    ckpt_every: int | None = None  # default: every evaluation
    eval_every: int | None = None  # default: 10 evaluations per run
    eval_limit: int | None = None  # validation items per periodic evaluation (the final one uses all)
    stop_after: int | None = None  # stop (with a checkpoint) after this step; continue with --resume
    compile: bool = False  # torch.compile, one graph per member (training.compiled)
    compile_backend: str = "inductor"
    channels_last: bool = False  # image models: NHWC weights and inputs
    amp: str | None = None  # bf16 | fp16 | none; None: bf16 on CUDA, none elsewhere (training.precision)
    accum_steps: int = 1  # each process's share of a step's batch runs in this many micro-batches
    ema: bool = False  # timm's ModelEmaV3 of the weights, evaluated and saved as model_ema.safetensors
    ema_decay: float | None = None  # default DEFAULT_EMA_DECAY (reached after timm's decay warmup)

    def check_flags(self) -> None:
        """What needs no model."""
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        at_least_one(self, "steps", "epochs", "batch_size", "ckpt_every", "eval_every", "eval_limit", "stop_after")
        at_least_one(self, "log_alignment", "accum_steps")
        if self.ema_decay is not None and not self.ema:
            raise ValueError("--ema-decay needs --ema")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.compile_backend != "inductor" and not self.compile:
            raise ValueError("--compile-backend needs --compile")

    def check(self, model_name: str, input_kind: str, space: str) -> None:
        """What depends on the model and the member space: compilation, channels-last."""
        if self.compile:
            check_backend(self.compile_backend)
            if space == "layerwise":
                raise ValueError(
                    "--compile compiles a graph per member, and --space layerwise draws a new member almost "
                    "every step; train it without --compile"
                )
        if self.channels_last and input_kind != "image":
            raise ValueError(f"--channels-last applies to image models (CNNs); {model_name} reads tokens")

    def resolved(self, input_kind: str) -> LoopConfig:
        ema_decay = self.ema_decay if self.ema_decay is not None or not self.ema else DEFAULT_EMA_DECAY
        return _fill(self, input_kind, ema_decay=ema_decay)

    def check_split(self, world_size: int, train_items: int) -> int:
        """The global batch over processes and micro-batches; returns the steps per epoch."""
        if self.batch_size % world_size:
            raise ValueError(f"--batch-size {self.batch_size} does not split evenly over {world_size} processes")
        if self.batch_size // world_size % self.accum_steps:
            raise ValueError(
                f"--batch-size {self.batch_size} does not split into {world_size} process(es) x {self.accum_steps} "
                "micro-batches (--accum-steps)"
            )
        if train_items < self.batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is larger than the training split ({train_items} items)")
        return train_items // self.batch_size


def with_schedule(loop: LoopConfig, optim: OptimConfig, steps_per_epoch: int, input_kind: str):
    """Fill in the step counts that depend on the data: steps, warmup, evaluation and checkpoint
    intervals."""
    steps = loop.steps or (loop.epochs * steps_per_epoch if loop.epochs else KIND_DEFAULTS[input_kind]["steps"])
    warmup = optim.warmup_steps if optim.warmup_steps is not None else steps // 20
    if warmup >= steps:
        raise ValueError(f"--warmup-steps {warmup} must be below the run's {steps} steps")
    eval_every = loop.eval_every or max(1, steps // 10)
    loop = dataclasses.replace(loop, steps=steps, eval_every=eval_every, ckpt_every=loop.ckpt_every or eval_every)
    return loop, dataclasses.replace(optim, warmup_steps=warmup)
