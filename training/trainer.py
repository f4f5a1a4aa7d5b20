"""The training loop: a family trained jointly with its members (or one member alone).

``train(TrainConfig(...))`` is everything ``zoo train`` does; the CLI only parses and prints.
Each step a strategy (:mod:`training.strategies`) names the members to train; each member's
forward and backward runs on the same batch, gradients are summed (all-reduced once per step
under DDP), and one optimizer step is taken, masked to the trained members' parameters
(:mod:`training.masking`), so a step that trains only a core leaves every other coordinate,
and its optimizer state, exactly as it was. That is one case of the paper's general rule
``x ← x - lr · m ⊙ g(x + δ)``; an update policy (:mod:`training.updates`, ``--update``) adds its
own perturbation and narrows the mask (SAM, extragradient, meProp, structured dropout).

Optimizers and schedule come from timm (``create_optimizer_v2``: SGD with momentum, optionally
Nesterov, or AdamW, no weight decay on biases and norms; ``CosineLRScheduler`` with linear
warmup, driven per step). The schedule is a pure function of the step, so resuming needs only
the step. Everything that decides a run's trajectory is in its checkpoint, so ``--resume``
ends bit-identical to a run never interrupted (same seed and device).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import zoo
from zoo import Subnet
from zoo.catalogue import unknown_model
from zoo.fileio import atomic_path, locked_folder
from zoo.subnet import DEFAULT_GRID, check_fraction, grid

from . import distributed
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from .compiled import check_backend, compile_model
from .data import DataBundle, batches, check_data_options, default_data, load_data
from .evaluate import default_batch_size, evaluate, metric_name
from .image_folder import INTERPOLATION
from .loader import TrainLoader, default_workers
from .masking import MaskCache
from .precision import Precision, resolve_amp
from .signals import Interrupted, StopSignals, signal_name
from .strategies import SPACES, STRATEGIES, LayerwiseSpace, Pass, Strategy, create_strategy, members_for
from .sync_bn import SyncBatchNorm
from .updates import UpdatePolicy, create_policy, partial_gradient

MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"  # --ema: the averaged weights, evaluated and saved beside the model
DEFAULT_EMA_DECAY = 0.9998
METRICS_FILE = "metrics.jsonl"
CALIBRATION_BATCHES = 20  # training batches (unaugmented) per member for final BN statistics
PERIODIC_CALIBRATION_BATCHES = 5  # the same before each periodic evaluation of a layerwise run

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

# Fields that decide a run's trajectory: a resumed run must agree on all of them.
_NOT_TRAJECTORY = {
    "out",
    "resume",
    "stop_after",
    "device",
    "workers",
    "ckpt_every",
    "eval_every",
    "eval_limit",
    "compile",
    "compile_backend",
    "channels_last",
    "dist_timeout",
}


@dataclass
class TrainConfig:
    """One training run. ``None`` means "the default for the model's input kind" (KIND_DEFAULTS)."""

    model: str
    out: str
    data: str | None = None
    strategy: str = "alternating"
    widths: list[float] | None = None  # default: 0.25, 0.5, 0.75, 1 (dense); 1 (low-rank)
    ranks: list[float] | None = None  # default with --low-rank: 0.25, 0.5, 0.75, 1
    extra_members: list[dict] | None = None  # --member: members of any structure, trained too
    space: str = "uniform"  # random/sandwich draw from the trained members, or "layerwise"
    low_rank: bool = False
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None  # the global batch, split over processes
    lr: float | None = None
    optimizer: str | None = None  # sgd | adamw
    weight_decay: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    warmup_steps: int | None = None  # default: 5% of the steps
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    core_prob: float = 0.5
    num_random: int = 2
    update: str = "full"  # the update policy: full | sam | extragradient | meprop | unit-dropout | rank-dropout
    rho: float | None = None  # sam
    eg_lr: float | None = None  # extragradient
    keep: float | None = None  # meprop, unit-dropout, rank-dropout
    meprop_units: bool = False
    nested: bool = False  # unit-dropout: a random width prefix
    log_alignment: int | None = None  # every N steps: cos(m ⊙ g(x + δ), g(x)) on a fixed batch
    seq_len: int = 256
    img_size: int | None = None  # default: the dataset's own; for folders, the model's input size
    # Data pipeline (training/loader.py, training/image_folder.py): timm's transforms and Mixup.
    aa: str | None = None  # folders: timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # folders: random-erasing probability
    crop_pct: float | None = None  # folders: evaluation crop (default 0.875)
    mixup: float = 0.0  # timm Mixup's mixup_alpha (0: off); soft targets
    cutmix: float = 0.0  # timm Mixup's cutmix_alpha (0: off)
    init: str | None = None
    resume: bool = False
    ckpt_every: int | None = None  # default: every evaluation
    eval_every: int | None = None  # default: 10 evaluations per run
    eval_limit: int | None = None  # validation items per periodic evaluation (the final one uses all)
    stop_after: int | None = None  # stop (with a checkpoint) after this step; continue with --resume
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # data-loading processes; default: none in memory, a share of the cores for folders
    # The loop: speed and memory (compile, channels_last), precision, accumulation, EMA, batch norm over processes.
    compile: bool = False  # torch.compile, one graph per member (training.compiled)
    compile_backend: str = "inductor"
    channels_last: bool = False  # image models: NHWC weights and inputs
    amp: str | None = None  # bf16 | fp16 | none; None: bf16 on CUDA, none elsewhere (training.precision)
    accum_steps: int = 1  # each process's share of a step's batch runs in this many micro-batches
    ema: bool = False  # timm's ModelEmaV3 of the weights, evaluated and saved as model_ema.safetensors
    ema_decay: float | None = None  # default DEFAULT_EMA_DECAY (reached after timm's decay warmup)
    sync_bn: bool = False  # batch-norm statistics over the global batch (training.sync_bn)
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S  # seconds a collective waits for a lost process

    def check(self) -> None:
        """Validate everything that needs no data, so bad flags fail in a second."""
        if self.model not in zoo.list_models():
            raise ValueError(unknown_model(self.model, zoo.list_models()))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.optimizer not in (None, "sgd", "adamw"):
            raise ValueError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        for name in (
            "steps",
            "epochs",
            "batch_size",
            "ckpt_every",
            "eval_every",
            "eval_limit",
            "stop_after",
            "seq_len",
            "img_size",
            "log_alignment",
        ):
            _check(name, getattr(self, name), lambda v: v >= 1, "at least 1")
        for name in ("lr", "clip_grad", "dist_timeout"):
            _check(name, getattr(self, name), lambda v: v > 0, "positive")
        for name in ("weight_decay", "warmup_steps", "workers", "momentum", "num_random", "mixup", "cutmix"):
            _check(name, getattr(self, name), lambda v: v >= 0, "non-negative")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        for w in self.widths or []:
            check_fraction("--width", w)
        if self.ranks and not self.low_rank:
            raise ValueError("--rank needs --low-rank (the dense family has no rank axis)")
        for r in self.ranks or []:
            check_fraction("--rank", r)
        resolve_amp(self.amp, distributed.resolve_device(self.device))
        if self.space not in SPACES:
            raise ValueError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}")
        model = self.meta_model()
        self._check_loop(model)
        check_data_options(
            self.data or default_data(model.input_kind), aa=self.aa, reprob=self.reprob, crop_pct=self.crop_pct
        )
        if (self.mixup or self.cutmix) and model.input_kind != "image":
            raise ValueError(f"--mixup and --cutmix mix images; {self.model} reads {model.input_kind}")
        space = LayerwiseSpace(model) if self.space == "layerwise" else None
        create_strategy(
            self.strategy,
            self.members(model),
            model.largest,
            self.seed,
            core_prob=self.core_prob,
            num_random=self.num_random,
            space=space,
        )
        self.policy(model, self.seed)

    def _check_loop(self, model: zoo.ElasticModel) -> None:
        """The loop's flags: accumulation, EMA, compilation, channels-last, synchronised batch norm."""
        _check("accum_steps", self.accum_steps, lambda v: v >= 1, "at least 1")
        if self.ema_decay is not None and not self.ema:
            raise ValueError("--ema-decay needs --ema")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.compile_backend != "inductor" and not self.compile:
            raise ValueError("--compile-backend needs --compile")
        if self.compile:
            check_backend(self.compile_backend)
            if self.space == "layerwise":
                raise ValueError(
                    "--compile compiles a graph per member, and --space layerwise draws a new member almost every step; train it without --compile"
                )
        if self.channels_last and model.input_kind != "image":
            raise ValueError(f"--channels-last applies to image models (CNNs); {self.model} reads tokens")
        if self.sync_bn:
            SyncBatchNorm(model)

    def policy(self, model: zoo.ElasticModel, seed: int) -> UpdatePolicy:
        return create_policy(
            self.update,
            model,
            seed,
            strategy=self.strategy,
            rho=self.rho,
            eg_lr=self.eg_lr,
            keep=self.keep,
            units=self.meprop_units,
            nested=self.nested,
        )

    def meta_model(self) -> zoo.ElasticModel:
        """The family's structure only (no memory, no initialisation): validates members."""
        with torch.device("meta"):
            return zoo.create_model(self.model, **self.init_architecture(), low_rank=self.low_rank)

    def init_architecture(self) -> dict:
        """The architecture arguments of the ``--init`` file (a converted ViT's patch size, a
        MobileNetV2's channel settings), without its members: the run chooses those."""
        header = zoo.read_header(self.init) if self.init else {}
        if header.get("arch") != self.model:  # another architecture: refused with its own message when loaded
            return {}
        members = {"low_rank", "widths", "ranks", "extra_subnets", "max_member"}
        return {k: v for k, v in header["model_args"].items() if k not in members}

    def member_lists(self) -> tuple[list[float], list[float] | None]:
        """The width and rank lists whose product (plus the largest member) is trained.

        Defaults: every width of the grid (dense) or every rank at width 1 (low-rank); for the
        separate baseline, the full value of each axis not given.
        """
        if self.extra_members and not self.widths and not self.ranks:
            return [], ([] if self.low_rank else None)  # only the given members (and the largest)
        if self.strategy == "separate":
            return self.widths or [1.0], ((self.ranks or [1.0]) if self.low_rank else None)
        widths = self.widths or ([1.0] if self.low_rank else list(DEFAULT_GRID))
        return widths, ((self.ranks or list(DEFAULT_GRID)) if self.low_rank else None)

    def members(self, model: zoo.ElasticModel) -> list[Subnet]:
        return members_for(self.strategy, *self.member_lists(), model, self.extra_members or ())

    def resolved(self, input_kind: str) -> "TrainConfig":
        """A copy with every default filled in (what the run records)."""
        defaults = KIND_DEFAULTS[input_kind]
        fills = {k: v for k, v in defaults.items() if k != "steps" and getattr(self, k) is None}
        data = self.data or default_data(input_kind)
        if data.startswith("folder:") and self.img_size is None:  # files of any size: the model's own input size
            fills["img_size"] = self.meta_model().pretrained_cfg["input_size"][-1]
        ema_decay = self.ema_decay if self.ema_decay is not None or not self.ema else DEFAULT_EMA_DECAY
        return dataclasses.replace(self, data=data, ema_decay=ema_decay, **fills)


def _check(name: str, value: float | None, ok, requirement: str) -> None:
    if value is not None and not ok(value):
        raise ValueError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")


@dataclass
class TrainResult:
    out: Path
    model_path: Path | None  # None when the run stopped early (stop_after)
    metrics: list[dict]  # final per-member metrics (empty when stopped early)
    steps: int  # steps done
    total_steps: int
    wall_time_s: float
    metric: str  # "accuracy" or "bits_per_byte"
    member_params: dict[str, int] = field(default_factory=dict)  # subnet key -> parameters
    stopped_by: int | None = None  # the signal (SIGTERM, SIGINT) that stopped the run after a checkpoint
    already_finished: bool = False  # resumed a finished run: nothing was trained or written
    ema_path: Path | None = None  # --ema: the averaged weights
    ema_metrics: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


class Reporter:
    """Receives a run's progress on rank 0 (the CLI draws it); by default ignores it."""

    def start(self, total_steps: int, done: int, description: str, batch_size: int) -> None: ...

    def step(self, step: int, loss: float, lr: float) -> None: ...

    def evaluated(self, step: int, records: list[dict]) -> None: ...

    def finish(self) -> None: ...


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run (or resume) one training run; returns the final metrics per member.

    Rank 0 holds the run folder's lock for the whole run, so a second run into it is refused
    (``zoo.fileio.FolderInUse``). SIGTERM or SIGINT ends the run after the current step with a
    checkpoint (``TrainResult.stopped_by``); a second one, or one outside the loop, raises
    :class:`~training.signals.Interrupted` and leaves the previous checkpoint.
    """
    config.check()
    ctx = distributed.setup(config.device, config.dist_timeout)
    if ctx.restart and (Path(config.out) / CHECKPOINT_NAME).exists():
        config = dataclasses.replace(config, resume=True)  # torchrun restarted the job (--max-restarts)
    lost = None
    try:
        with (
            StopSignals() as signals,
            locked_folder(config.out, "zoo train") if ctx.is_main else contextlib.nullcontext(),
        ):
            trainer = None
            try:
                trainer = Trainer(config, ctx, reporter or Reporter(), signals)
                return trainer.run()
            except RuntimeError as err:  # a collective failed: another process is gone?
                lost = ctx.lost(err)
                if lost is None:
                    raise
                where = f" at step {trainer.step + 1}" if trainer is not None else ""
                kept = trainer.last_checkpoint_note() if trainer is not None else _kept_note(config)
                raise distributed.LostProcess(f"{lost}{where} ({lost.cause}); {kept}", lost.cause) from None
            except Interrupted as stop:
                kept = _kept_note(config)
                raise Interrupted(stop.signum, f"stopped at once by {signal_name(stop.signum)}; {kept}") from None
    finally:
        ctx.close(failed=lost is not None)


def _kept_note(config: TrainConfig) -> str:
    checkpoint = Path(config.out) / CHECKPOINT_NAME
    return f"{checkpoint} is as it was; continue with --resume" if checkpoint.exists() else "no checkpoint was written"


def _with_schedule(cfg: TrainConfig, steps_per_epoch: int, default_steps: int) -> TrainConfig:
    """Fill in the step counts that depend on the data: steps, warmup, evaluation and
    checkpoint intervals."""
    steps = cfg.steps or (cfg.epochs * steps_per_epoch if cfg.epochs else default_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else steps // 20
    if warmup >= steps:
        raise ValueError(f"--warmup-steps {warmup} must be below the run's {steps} steps")
    eval_every = cfg.eval_every or max(1, steps // 10)
    return dataclasses.replace(
        cfg, steps=steps, warmup_steps=warmup, eval_every=eval_every, ckpt_every=cfg.ckpt_every or eval_every
    )


def _check_same_run(saved: dict, cfg: TrainConfig, out: Path) -> None:
    """A resumed run must agree with its checkpoint on everything that shapes the trajectory."""
    current = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # fields newer than the checkpoint
    saved = {**defaults, **saved}
    diffs = [
        f"{k}={saved.get(k)!r} (now {v!r})"
        for k, v in current.items()
        if k not in _NOT_TRAJECTORY and saved.get(k) != v
    ]
    if diffs:
        raise ValueError(
            f"--resume: the checkpoint in {out} was written with other settings: {', '.join(diffs)}; resume with the original flags"
        )


def input_kind_of(model_name: str) -> str:
    with torch.device("meta"):  # shapes only: instant, no memory
        return zoo.create_model(model_name).input_kind


def _seed_of(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _hard_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on labels; on mixup's soft targets (smoothing already in them), timm's
    ``SoftTargetCrossEntropy``."""
    if targets.is_floating_point():
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()(logits.float(), targets)
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), label_smoothing=label_smoothing)


def _distill_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's soft outputs (KL up to the teacher's fixed entropy)."""
    soft = F.softmax(teacher.float().flatten(0, -2), dim=-1)
    return -(soft * F.log_softmax(logits.float().flatten(0, -2), dim=-1)).sum(-1).mean()


class Trainer:
    """One run: set up from a config (fresh, from --init, or resumed), loop, finish."""

    def __init__(
        self, config: TrainConfig, ctx: distributed.DistContext, reporter: Reporter, signals: StopSignals | None = None
    ):
        self.ctx, self.reporter = ctx, reporter
        self.signals = signals or StopSignals()
        self.out = Path(config.out)
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        self.started = time.perf_counter()
        kind = input_kind_of(config.model)
        cfg = config.resolved(kind)
        if not cfg.resume and self.checkpoint_path.exists():
            raise ValueError(
                f"{self.out} already holds a training checkpoint; pass --resume to continue it, or choose another --out"
            )
        if cfg.resume and not self.checkpoint_path.exists():
            raise ValueError(f"--resume: no checkpoint in {self.out} (expected {self.checkpoint_path})")
        checkpoint = load_checkpoint(self.checkpoint_path) if cfg.resume else None

        _seed_everything(cfg.seed)
        self.data = load_data(
            cfg.data,
            seq_len=cfg.seq_len,
            seed=cfg.seed,
            img_size=cfg.img_size,
            aa=cfg.aa,
            reprob=cfg.reprob,
            crop_pct=cfg.crop_pct,
        )
        if self.data.kind != kind:
            raise ValueError(f"{cfg.model} reads {kind}, but data {cfg.data!r} holds {self.data.kind}")
        if cfg.batch_size % ctx.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over {ctx.world_size} processes")
        if cfg.batch_size // ctx.world_size % cfg.accum_steps:
            raise ValueError(
                f"--batch-size {cfg.batch_size} does not split into {ctx.world_size} process(es) x {cfg.accum_steps} micro-batches (--accum-steps)"
            )
        self.workers = default_workers(self.data) if cfg.workers is None else cfg.workers
        self.loader = TrainLoader(self.data, cfg.batch_size, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, workers=self.workers,
                                  pin_memory=ctx.device.type == "cuda", mixup=cfg.mixup, cutmix=cfg.cutmix, label_smoothing=cfg.label_smoothing)  # fmt: skip
        self.steps_per_epoch = len(self.data.train) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch-size {cfg.batch_size} is larger than the training split ({len(self.data.train)} items)"
            )
        self.cfg = cfg = _with_schedule(cfg, self.steps_per_epoch, KIND_DEFAULTS[kind]["steps"])
        self.total_steps = cfg.steps
        if checkpoint is not None:
            _check_same_run(checkpoint["config"], cfg, self.out)

        self.members = cfg.members(cfg.meta_model())
        self.model = self._create_model().to(
            ctx.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format
        )
        self.precision = Precision(resolve_amp(cfg.amp, ctx.device), ctx.device)
        self.masks = MaskCache(self.model)
        space = LayerwiseSpace(self.model) if cfg.space == "layerwise" else None
        self.strategy: Strategy = create_strategy(
            cfg.strategy,
            self.members,
            self.model.largest,
            _seed_of("strategy", cfg.seed),
            core_prob=cfg.core_prob,
            num_random=cfg.num_random,
            space=space,
        )
        self.policy = cfg.policy(self.model, _seed_of("update", cfg.seed))
        self.optimizer = self._create_optimizer()
        self.scheduler = self._create_scheduler()
        self.alignment_batch = self._alignment_batch() if cfg.log_alignment else None
        self.step, self.history, self.previous_wall_s, self.checkpoint_step = 0, [], 0.0, None
        if checkpoint is not None:
            self._restore(checkpoint)
        elif cfg.init:
            _load_init(self.model, cfg.init)
        self.attempts = [  # every start of the run: after a resume, torchrun's restarts, on fewer processes
            *(checkpoint or {}).get("attempts", []),
            {"from_step": self.step, "world_size": ctx.world_size, "restart": ctx.restart},
        ]
        self.ema = self._create_ema(checkpoint)
        self.sync_bn = SyncBatchNorm(self.model) if cfg.sync_bn else None
        self.net = self._wrap_ddp()
        if cfg.compile:
            self.net = compile_model(self.net, cfg.compile_backend, len(self.members))

    # ----- setup ------------------------------------------------------------------------------
    def _create_model(self) -> zoo.ElasticModel:
        """The family at full size whose grid is exactly the trained members, so that each
        has its own batch-norm statistics."""
        cfg, data = self.cfg, self.data
        widths, ranks = cfg.member_lists()
        product = set(grid(widths, ranks))
        args: dict = {**cfg.init_architecture(), "low_rank": cfg.low_rank, "widths": widths, "ranks": ranks}
        extra = [s.to_dict() for s in self.members if s not in product]
        if extra:
            args["extra_subnets"] = extra
        if data.kind == "tokens":
            args["context_length"] = data.seq_len
        else:
            channels, height, _ = data.input_size
            args.update(num_classes=data.num_classes, in_chans=channels, img_size=height)
        return zoo.create_model(cfg.model, **args)

    def _create_optimizer(self) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        cfg = self.cfg
        if cfg.optimizer == "sgd":  # timm: "sgd" is Nesterov SGD, "momentum" is classical momentum
            name = "sgd" if cfg.nesterov else "momentum"
            return create_optimizer_v2(
                self.model, name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
            )
        return create_optimizer_v2(self.model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _create_scheduler(self):
        from timm.scheduler import CosineLRScheduler

        cfg = self.cfg
        return CosineLRScheduler(
            self.optimizer,
            t_initial=max(1, self.total_steps - cfg.warmup_steps),
            warmup_t=cfg.warmup_steps,
            warmup_lr_init=cfg.lr * 0.01,
            warmup_prefix=True,
            t_in_epochs=False,  # driven per step by step_update
        )

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.ctx.distributed:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        # A member that leaves a parameter entirely unused needs DDP's unused-parameter search.
        unused = self.cfg.space == "layerwise" or any(
            not bool(m.any()) for s in self.members for m in (self.masks.member(s) or {}).values()
        )
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=unused)

    def _create_ema(self, checkpoint: dict | None):
        """timm's ModelEmaV3 of the weights (rank 0 keeps it), with its decay warmup
        ``1 - (1 + step) ** -2/3`` capped at ``--ema-decay``: short runs average over their
        recent steps rather than stay near the initialisation."""
        if not self.cfg.ema or not self.ctx.is_main:
            return None
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(self.model, decay=self.cfg.ema_decay, use_warmup=True)
        if checkpoint is not None:
            ema.load_state_dict(checkpoint["ema"])
        return ema

    # ----- checkpoints ------------------------------------------------------------------------
    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.strategy.load_state_dict(checkpoint["strategy"])
        if "update" in checkpoint:
            self.policy.load_state_dict(checkpoint["update"])
        self.precision.load_state_dict(checkpoint.get("precision", {}))
        set_rng_states(checkpoint["rng"])
        self.step = self.checkpoint_step = int(checkpoint["step"])
        self.history = list(checkpoint["history"])
        self.previous_wall_s = float(checkpoint["wall_time_s"])

    def _save_checkpoint(self) -> None:
        self.checkpoint_step = self.step
        if not self.ctx.is_main:
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "config": dataclasses.asdict(self.cfg),
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "strategy": self.strategy.state_dict(),
                "update": self.policy.state_dict(),
                "precision": self.precision.state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                "rng": rng_states(),
                "history": self.history,
                "wall_time_s": self.wall_time_s,
                "attempts": self.attempts,
            },
        )

    @property
    def wall_time_s(self) -> float:
        return self.previous_wall_s + time.perf_counter() - self.started

    # ----- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        end = self.total_steps if cfg.stop_after is None else min(cfg.stop_after, self.total_steps)
        described = f"{cfg.model} {cfg.strategy} ({len(self.members)} member{'s' * (len(self.members) > 1)})"
        if self.step >= self.total_steps and (self.out / MODEL_FILE).exists():
            return self._already_finished()
        self.signals.deferring = True  # from here a signal lets the step finish, then checkpoints
        if self.ctx.is_main:
            self.reporter.start(self.total_steps, self.step, described, cfg.batch_size)
            self._write_metrics()
        self.model.train()
        interval_start, interval_steps = time.perf_counter(), 0
        try:
            while self.step < end:
                epoch, position = divmod(self.step, self.steps_per_epoch)
                for inputs, targets in self._epoch_batches(epoch, position):
                    losses = self._train_step(self._on_device(inputs), targets.to(self.ctx.device, non_blocking=True))
                    self.step += 1
                    interval_steps += 1
                    if self.ctx.is_main:
                        self.reporter.step(self.step, sum(losses) / len(losses), self.optimizer.param_groups[0]["lr"])
                    if self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                        throughput = interval_steps * cfg.batch_size / (time.perf_counter() - interval_start)
                        self._periodic_evaluation(throughput)
                        interval_start, interval_steps = time.perf_counter(), 0
                    if self.step % cfg.ckpt_every == 0 or self.step == end:
                        self._save_checkpoint()
                    signum = self.ctx.agreed_signal(self.signals.requested)
                    if signum is not None:
                        return self._stop(signum)
                    if self.step >= end:
                        break
            self.signals.deferring = False  # the last checkpoint is written: a signal now stops at once
            self.loader.close()  # its workers are not needed to evaluate and save
            throughput = interval_steps * cfg.batch_size / max(time.perf_counter() - interval_start, 1e-9)
            if self.step < self.total_steps:
                return self._result(None, [])
            return self._finish(throughput)
        finally:
            self.signals.deferring = False
            self.loader.close()
            if self.ctx.is_main:
                self.reporter.finish()

    def _stop(self, signum: int) -> TrainResult:
        """Every process stops at this step; rank 0 checkpoints it (a second signal while it
        writes raises ``Interrupted`` and leaves the previous checkpoint)."""
        if self.checkpoint_step != self.step:
            self._save_checkpoint()
        self.ctx.barrier()  # the others end only once the checkpoint is written
        return self._result(None, [], stopped_by=signum)

    def _already_finished(self) -> TrainResult:
        """``--resume`` of a run that wrote its weights: report them, rewrite nothing."""
        metadata = zoo.read_header(self.out / MODEL_FILE).get("metadata") or {}
        result = self._result(self.out / MODEL_FILE, metadata.get("metrics") or [])
        result.wall_time_s = float((metadata.get("train") or {}).get("wall_time_s", result.wall_time_s))
        result.already_finished = True
        return result

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's share of the global batches of ``epoch`` from batch ``start`` on: a
        pure function of (seed, epoch, batch, rank) (:mod:`training.loader`)."""
        yield from self.loader.epoch(epoch, start)

    def _on_device(self, inputs: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.cfg.channels_last else torch.preserve_format
        return inputs.to(self.ctx.device, non_blocking=True, memory_format=memory_format)

    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """One step of ``x ← x - lr · m ⊙ g(x + δ)``. The strategy's members are one choice of
        ``m`` and ``δ``: each pass evaluates its member alone (``set_subnet`` slices the weights:
        ``δ = -(1 - m) ⊙ x`` as a slice) and the mask is the union of their regions; the update
        policy adds its ``δ`` and narrows ``m`` (:func:`training.updates.partial_gradient`)."""
        plan = self.strategy.plan(self.step)
        self.scheduler.step_update(self.step)
        members = self.masks.union(part.subnet for part in plan)
        if self.alignment_batch is not None and self.step % self.cfg.log_alignment == 0:
            self._log_alignment(plan, members)
        gradient = lambda: self._gradient(plan, inputs, targets)  # noqa: E731
        losses, mask = partial_gradient(
            self.policy, gradient, members, self.precision.unscaled(gradient, self.policy.params)
        )
        values = self.ctx.mean(torch.stack(losses)).tolist()
        for part, value in zip(plan, values):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss is {value} at step {self.step + 1} (member {part.subnet}); stopped, {self._last_checkpoint()}"
                )
        self.precision.step(self.optimizer, mask, self.cfg.clip_grad, self.model.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step + 1)
        return values

    def _gradient(
        self, plan: list[Pass], inputs: torch.Tensor, targets: torch.Tensor, sync: bool = True
    ) -> list[torch.Tensor]:
        """Forward and backward of the step's passes at the current weights, gradients summed
        in ``.grad`` (all-reduced once, on the last backward, when ``sync``); the detached
        losses. This process's share of the batch runs in ``--accum-steps`` equal micro-batches,
        each loss divided by their number, so ``.grad`` is the gradient of the share's mean
        loss, as in one pass (up to batch norm, which sees each micro-batch alone)."""
        chunks = self.cfg.accum_steps
        losses: list = [0.0] * len(plan)
        with self.sync_bn.active() if self.sync_bn else contextlib.nullcontext():
            for j, (micro_inputs, micro_targets) in enumerate(zip(inputs.chunk(chunks), targets.chunk(chunks))):
                teacher = None
                for i, part in enumerate(plan):
                    if self.model.active_subnet != part.subnet:
                        self.model.set_subnet(
                            part.subnet, for_training=True
                        )  # a drawn member trains on batch statistics
                    last = sync and j == chunks - 1 and i == len(plan) - 1
                    with contextlib.nullcontext() if last or not self.ctx.distributed else self.net.no_sync():
                        with self.precision.autocast():
                            logits = self.net(micro_inputs)
                        loss = (
                            _distill_loss(logits, teacher)
                            if part.distill
                            else _hard_loss(logits, micro_targets, self.cfg.label_smoothing)
                        )
                        self.precision.backward(loss / chunks)
                    if i == 0 and len(plan) > 1:
                        teacher = logits.detach()
                    losses[i] = losses[i] + loss.detach() / chunks
        return losses

    def _alignment_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch of unaugmented training items: where the alignment is measured."""
        inputs, targets = next(iter(DataLoader(self._calibration_data(), batch_size=self.cfg.batch_size)))
        return inputs.to(self.ctx.device), targets.to(self.ctx.device)

    def _log_alignment(self, plan: list[Pass], members) -> None:
        """The theory's condition on the fixed batch, for this step's plan and policy:
        ``cos(m ⊙ g(x + δ), g(x))`` and ``‖m ⊙ g(x + δ)‖ / ‖g(x)‖``, with ``g(x)`` the largest
        member's gradient. Leaves no trace on the run: the policy's generator, batch-norm
        statistics and the global RNG are put back, so the trajectory does not change."""
        started = time.perf_counter()
        inputs, targets = self.alignment_batch
        params = self.policy.params
        policy_state, rng = copy.deepcopy(self.policy.state_dict()), torch.get_rng_state()
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        gradient = lambda: self._gradient(plan, inputs, targets, sync=False)  # noqa: E731
        _, mask = partial_gradient(self.policy, gradient, members, self.precision.unscaled(gradient, params))
        masks = mask or {}
        update = [
            torch.zeros_like(p) if p.grad is None else p.grad * masks[p] if p in masks else p.grad for p in params
        ]
        self.optimizer.zero_grad(set_to_none=True)
        self._gradient([Pass(self.model.largest)], inputs, targets, sync=False)
        full = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.load_state_dict(policy_state)
        torch.set_rng_state(rng)
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])
        dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(update, full))
        norm_update = math.sqrt(sum(float(a.double().pow(2).sum()) for a in update))
        norm_full = math.sqrt(sum(float(b.double().pow(2).sum()) for b in full))
        record = {
            "step": self.step,
            "alignment_cosine": dot / max(norm_update * norm_full, 1e-30),
            "alignment_norm_ratio": norm_update / max(norm_full, 1e-30),
            "alignment_s": round(time.perf_counter() - started, 4),
        }
        self.history.append(record)
        if self.ctx.is_main:
            self._write_metrics()

    def last_checkpoint_note(self) -> str:
        if self.checkpoint_step is None:
            return "no checkpoint was written"
        return f"the last checkpoint is {self.checkpoint_path} (step {self.checkpoint_step})"

    def _last_checkpoint(self) -> str:
        if self.checkpoint_step is None:
            return "no checkpoint was written yet; lower --lr or add --clip-grad"
        return f"the last good checkpoint is {self.checkpoint_path} (step {self.checkpoint_step}); lower --lr or add --clip-grad"

    # ----- evaluation and the end -------------------------------------------------------------
    def _periodic_evaluation(self, throughput: float) -> None:
        if not self.ctx.is_main:
            return
        if (self.cfg.space == "layerwise" or self.policy.distorts_statistics) and self.model.uses_batchnorm:
            self._recalibrate(
                PERIODIC_CALIBRATION_BATCHES
            )  # drawn members (or dropped units) skew the running statistics
        records = evaluate(
            self.model, self.data.val, self.members, self.eval_batch_size, self.cfg.eval_limit, workers=self.workers
        )
        self._log(records, throughput)

    def _log(self, records: list[dict], throughput: float, final: bool = False) -> None:
        entries = [
            {"step": self.step, **r, "samples_per_s": round(throughput, 2), **({"final": True} if final else {})}
            for r in records
        ]
        self.history.extend(entries)
        self._write_metrics()
        self.reporter.evaluated(self.step, records)

    def _write_metrics(self) -> None:
        with atomic_path(self.out / METRICS_FILE) as tmp:
            tmp.write_text("".join(json.dumps(entry) + "\n" for entry in self.history))

    def _finish(self, throughput: float) -> TrainResult:
        """Rank 0: recalibrate batch norm per member, evaluate, write the weights file."""
        if not self.ctx.is_main:
            return self._result(None, [])
        if self.model.uses_batchnorm:
            self._recalibrate(CALIBRATION_BATCHES)
        metrics = evaluate(self.model, self.data.val, self.members, self.eval_batch_size, workers=self.workers)
        self._log(metrics, throughput, final=True)
        ema_metrics = (
            self._finish_ema() if self.ema is not None else []
        )  # before the model file, which marks the run finished
        path = zoo.save(self.model, self.out / MODEL_FILE, metadata={"metrics": metrics, "train": self._provenance()})
        result = self._result(path, metrics)
        if self.ema is not None:
            result.ema_path, result.ema_metrics = self.out / EMA_FILE, ema_metrics
        return result

    def _finish_ema(self) -> list[dict]:
        """The EMA weights as their own weights file, recalibrated and evaluated like the model;
        their metrics go to metrics.jsonl marked ``"ema": true``."""
        model = self.ema.module
        if model.uses_batchnorm:
            self._recalibrate(CALIBRATION_BATCHES, model)
        metrics = evaluate(model, self.data.val, self.members, self.eval_batch_size, workers=self.workers)
        self.history.extend({"step": self.step, **r, "ema": True, "final": True} for r in metrics)
        self._write_metrics()
        zoo.save(
            model,
            self.out / EMA_FILE,
            metadata={"metrics": metrics, "train": {**self._provenance(), "ema_decay": self.cfg.ema_decay}},
        )
        return metrics

    def _recalibrate(self, num_batches: int, model: zoo.ElasticModel | None = None) -> None:
        """Batch-norm statistics of every trained member from ``num_batches`` training batches."""
        calibration = self._calibration_data()
        for subnet in self.members:
            inputs = (
                x.to(self.ctx.device)
                for x in batches(calibration, self.cfg.batch_size, limit=num_batches, workers=self.workers)
            )
            zoo.recalibrate_bn(model or self.model, inputs, subnet)

    def _calibration_data(self):
        """A fixed random subset of the training split, without augmentation."""
        train = self.data.train
        if getattr(train, "augment", False):
            train = copy.copy(train)
            train.augment = False
        count = min(len(train), CALIBRATION_BATCHES * self.cfg.batch_size)
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(_seed_of("calibration", self.cfg.seed))
        )
        return Subset(train, order[:count].tolist())

    @property
    def eval_batch_size(self) -> int:
        return default_batch_size(self.model)

    def _provenance(self) -> dict:
        data: DataBundle = self.data
        info = {
            "config": dataclasses.asdict(self.cfg),
            "strategy": self.cfg.strategy,
            "members": [s.to_dict() for s in self.members],
            "steps": self.total_steps,
            "epochs": round(self.total_steps / self.steps_per_epoch, 3),
            "data": data.spec,
            "seed": self.cfg.seed,
            "world_size": self.ctx.world_size,
            "attempts": self.attempts,
            "device": self.ctx.device.type,
            "amp": self.precision.amp,
            "wall_time_s": round(self.wall_time_s, 2),
        }
        if data.kind == "tokens":
            info.update(vocab="bytes", vocab_size=data.num_classes, seq_len=data.seq_len)
        else:
            info.update(labels=data.labels, input_size=list(data.input_size), mean=list(data.mean), std=list(data.std))
            if data.crop_pct is not None:  # folders: evaluation resized to size / crop_pct, centre-cropped
                info.update(crop_pct=data.crop_pct, interpolation=INTERPOLATION)
        return info

    def _result(self, path: Path | None, metrics: list[dict], stopped_by: int | None = None) -> TrainResult:
        params = {subnet.key: zoo.count_params(self.model, subnet) for subnet in self.members}
        return TrainResult(
            self.out,
            path,
            metrics,
            self.step,
            self.total_steps,
            self.wall_time_s,
            metric_name(self.model),
            params,
            stopped_by=stopped_by,
        )


def _load_init(model: zoo.ElasticModel, path: str) -> None:
    """Start from a zoo weights file of the same architecture (parameters must all fit)."""
    source = zoo.load(path)
    if source.arch != model.arch:
        raise ValueError(f"--init {path} holds {source.arch} weights, but this run trains {model.arch}")
    if source.low_rank != model.low_rank:
        kinds = {True: "low-rank", False: "dense"}
        raise ValueError(
            f"--init {path} holds the {kinds[source.low_rank]} {source.arch}, but this run trains it {kinds[model.low_rank]} (--low-rank)"
        )
    src, dst = source.state_dict(), model.state_dict()
    params = dict(model.named_parameters())
    problems = [f"missing {k}" for k in params if k not in src]
    problems += [
        f"{k} is {tuple(src[k].shape)}, expected {tuple(v.shape)}"
        for k, v in params.items()
        if k in src and src[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ValueError(f"--init {path} does not fit {model.arch} as configured here: {'; '.join(problems[:2])}{more}")
    with torch.no_grad():
        for name, tensor in dst.items():  # parameters, and batch-norm statistics of shared members
            if name in src and src[name].shape == tensor.shape:
                tensor.copy_(src[name])
