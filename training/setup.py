"""A training run set up: from a config (fresh, from ``--init``, or resumed) to the data, the
model, the strategy, the update policy, the optimizer and everything else the loop
(:mod:`training.trainer`) steps. Checkpoints are written and read here: everything that decides
a run's trajectory is in one, so ``--resume`` ends bit-identical to a run never interrupted
(same seed and device).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import zoo
from zoo.space import grid

from . import distributed
from .bundle import repeat_channels, seed_of
from .checkpoint import (
    CHECKPOINT_NAME,
    RESTORE_ERRORS,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
    unfit_checkpoint,
)
from .compiled import compile_model
from .config import TrainConfig
from .loader import TrainLoader, default_workers
from .loop import with_schedule
from .masking import MaskCache
from .model_data import data_for
from .precision import Precision, resolve_amp
from .signals import StopSignals
from .sync_bn import SyncBatchNorm

MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"  # --ema: the averaged weights, evaluated and saved beside the model
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (CHECKPOINT_NAME, MODEL_FILE, EMA_FILE, METRICS_FILE)  # what a run writes: --overwrite removes them
CALIBRATION_BATCHES = 20  # training batches (unaugmented) per member for final BN statistics


class Setup:
    """Everything a run steps, built from its config; the loop is :class:`training.trainer.Trainer`."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: distributed.DistContext,
        signals: StopSignals | None = None,
        structure: zoo.ElasticModel | None = None,
    ):
        """``structure``: what ``config.check()`` returned, when the caller validated it already."""
        self.ctx, self.signals = ctx, signals or StopSignals()
        self.out = Path(config.out)
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        self.started = time.perf_counter()
        structure = structure if structure is not None else config.check()
        self.carried = dict(
            getattr(structure, "zoo_metadata", {})
        )  # the --init file's tokenizer, in every file the run writes
        cfg = config.resolved(structure)
        if cfg.resume and cfg.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one")
        self.overwritten = self._overwrite() if cfg.overwrite else []
        if not cfg.resume and self.checkpoint_path.exists():
            if (self.out / MODEL_FILE).exists():
                raise ValueError(
                    f"{self.out} holds a finished run; choose a new --out, or pass --overwrite to replace it "
                    "(nothing of the old run is kept)"
                )
            raise ValueError(
                f"{self.out} holds an unfinished run; pass --resume to continue it, --overwrite to start over, or "
                "choose a new --out"
            )
        if cfg.resume and not self.checkpoint_path.exists():
            raise ValueError(f"--resume: no checkpoint in {self.out} (expected {self.checkpoint_path})")
        checkpoint = load_checkpoint(self.checkpoint_path) if cfg.resume else None
        _seed_everything(cfg.seed)
        self.cfg = self._load_data(cfg, structure)
        if checkpoint is not None:
            self.cfg.check_same_run(checkpoint["config"])
        self._build(structure, checkpoint)

    def _overwrite(self) -> list[str]:
        """``--overwrite``: rank 0 removes every file an earlier run wrote into the folder; the
        others wait, so none of them sees the old checkpoint."""
        removed = [name for name in RUN_FILES if (self.out / name).exists()]
        if self.ctx.is_main:
            for name in removed:
                (self.out / name).unlink()
        self.ctx.barrier()
        return removed

    def _load_data(self, cfg: TrainConfig, structure: zoo.ElasticModel) -> TrainConfig:
        """The data, its loader, and the config with the schedule the data decides."""
        self.data = data_for(structure, "train", cfg.inputs.data, cfg.inputs, seed=cfg.seed)
        if cfg.init and self.data.kind == "image" and self.data.input_size[0] == 1 < structure.in_chans:
            self.data = repeat_channels(self.data, structure.in_chans)  # grey data for an RGB --init: lossless
        self.steps_per_epoch = cfg.loop.check_split(self.ctx.world_size, len(self.data.train))
        self.workers = default_workers(self.data) if cfg.inputs.workers is None else cfg.inputs.workers
        self.loader = TrainLoader(self.data, cfg.loop.batch_size, seed=cfg.seed, rank=self.ctx.rank,
                                  world_size=self.ctx.world_size, workers=self.workers,
                                  pin_memory=self.ctx.device.type == "cuda", mixup=cfg.inputs.mixup,
                                  cutmix=cfg.inputs.cutmix, label_smoothing=cfg.optim.label_smoothing)  # fmt: skip
        loop, optim = with_schedule(cfg.loop, cfg.optim, self.steps_per_epoch, structure.input_kind)
        self.total_steps = loop.steps
        return dataclasses.replace(cfg, loop=loop, optim=optim)

    def _build(self, structure: zoo.ElasticModel, checkpoint: dict | None) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.members = cfg.members.members(structure)
        memory_format = torch.channels_last if cfg.loop.channels_last else torch.preserve_format
        self.model = self._create_model().to(ctx.device, memory_format=memory_format)
        self.precision = Precision(resolve_amp(cfg.loop.amp, ctx.device), ctx.device)
        self.masks = MaskCache(self.model)
        self.strategy = cfg.members.create(self.model, self.members, seed_of("strategy", cfg.seed))
        self.policy = cfg.updates.create(self.model, seed_of("update", cfg.seed), cfg.members.strategy)
        self.optimizer, self.scheduler = cfg.optim.create(self.model, self.total_steps)
        self.alignment_batch = self._alignment_batch() if cfg.loop.log_alignment else None
        self.step, self.history, self.previous_wall_s, self.checkpoint_step = 0, [], 0.0, None
        if checkpoint is not None:
            try:
                self._restore(checkpoint)
            except RESTORE_ERRORS as err:
                raise unfit_checkpoint(self.checkpoint_path, err) from None
        elif cfg.init:
            _load_init(self.model, cfg.init)
        self.attempts = [  # every start of the run: after a resume, torchrun's restarts, on fewer processes
            *(checkpoint or {}).get("attempts", []),
            {"from_step": self.step, "world_size": ctx.world_size, "restart": ctx.restart},
        ]
        self.ema = self._create_ema(checkpoint)
        self.sync_bn = SyncBatchNorm(self.model) if cfg.dist.sync_bn else None
        self.net = self._wrap_ddp()
        if cfg.loop.compile:
            self.net = compile_model(self.net, cfg.loop.compile_backend, len(self.members))

    def _create_model(self) -> zoo.ElasticModel:
        """The family at full size whose grid is exactly the trained members, so that each
        has its own batch-norm statistics."""
        cfg, data = self.cfg, self.data
        widths, ranks = cfg.members.member_lists()
        product = set(grid(widths, ranks))
        args: dict = {**cfg.init_architecture(), "low_rank": cfg.members.low_rank, "widths": widths, "ranks": ranks}
        extra = [s.to_dict() for s in self.members if s not in product]
        if extra:
            args["extra_members"] = extra
        if data.kind == "tokens":  # an --init model keeps a longer context it was made for
            args["context_length"] = max(data.seq_len, args.get("context_length", 0))
        else:
            channels, height, _ = data.input_size
            args.update(num_classes=data.num_classes, in_chans=channels, img_size=height)
        return zoo.create_model(cfg.model, **args)

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.ctx.distributed:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        # A member that leaves a parameter entirely unused needs DDP's unused-parameter search.
        unused = self.cfg.members.space == "layerwise" or any(
            not bool(m.any()) for s in self.members for m in (self.masks.member(s) or {}).values()
        )
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=unused)

    def _create_ema(self, checkpoint: dict | None):
        """timm's ModelEmaV3 of the weights (rank 0 keeps it), with its decay warmup
        ``1 - (1 + step) ** -2/3`` capped at ``--ema-decay``: short runs average over their
        recent steps rather than stay near the initialisation."""
        if not self.cfg.loop.ema or not self.ctx.is_main:
            return None
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(self.model, decay=self.cfg.loop.ema_decay, use_warmup=True)
        if checkpoint is not None:
            ema.load_state_dict(checkpoint["ema"])
        return ema

    def _alignment_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch of unaugmented training items: where the alignment is measured."""
        batch = DataLoader(self._calibration_data(), batch_size=self.cfg.loop.batch_size)
        inputs, targets = next(iter(batch))
        return inputs.to(self.ctx.device), targets.to(self.ctx.device)

    def _calibration_data(self):
        """A fixed random subset of the training split, without augmentation."""
        train = self.data.train
        if getattr(train, "augment", False):
            train = copy.copy(train)
            train.augment = False
        count = min(len(train), CALIBRATION_BATCHES * self.cfg.loop.batch_size)
        generator = torch.Generator().manual_seed(seed_of("calibration", self.cfg.seed))
        return Subset(train, torch.randperm(len(train), generator=generator)[:count].tolist())

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
        state = {
            "config": self.cfg.flags(),
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
        }
        save_checkpoint(self.checkpoint_path, state)

    @property
    def wall_time_s(self) -> float:
        return self.previous_wall_s + time.perf_counter() - self.started


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_init(model: zoo.ElasticModel, path: str) -> None:
    """Start from a zoo weights file of the same architecture (parameters must all fit)."""
    source = zoo.load(path)
    if source.arch != model.arch:
        raise ValueError(f"--init {path} holds {source.arch} weights, but this run trains {model.arch}")
    if source.low_rank != model.low_rank:
        kinds = {True: "low-rank", False: "dense"}
        raise ValueError(
            f"--init {path} holds the {kinds[source.low_rank]} {source.arch}, but this run trains it "
            f"{kinds[model.low_rank]} (--low-rank)"
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
