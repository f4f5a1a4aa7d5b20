"""The training loop: a family trained jointly with its members (or one member alone).

``train(TrainConfig(...))`` is everything ``zoo train`` does; the CLI only parses and prints.
Each step a strategy (:mod:`training.strategies`) names the members to train; each member's
forward and backward runs on the same batch, gradients are summed (all-reduced once per step
under DDP), and one optimizer step is taken, masked to the trained members' parameters
(:mod:`training.masking`), so a step that trains only a core leaves every other coordinate,
and its optimizer state, exactly as it was. That is one case of the paper's general rule
``x ← x - lr · m ⊙ g(x + δ)``; an update policy (:mod:`training.updates`, ``--update``) adds its
own perturbation and narrows the mask (SAM, extragradient, meProp, structured dropout).

The run is set up by :class:`training.setup.Setup` (data, model, optimizer, checkpoints); the
configuration's parts are described in :mod:`training.config`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

import zoo
from zoo.fileio import atomic_path, locked_folder

from . import distributed
from .bundle import DataBundle
from .checkpoint import CHECKPOINT_NAME
from .config import TrainConfig
from .data import absolute_spec, batches
from .evaluate import default_batch_size, evaluate, metric_name
from .image_folder import INTERPOLATION
from .loop import distill_loss
from .setup import CALIBRATION_BATCHES, EMA_FILE, METRICS_FILE, MODEL_FILE, Setup
from .signals import Interrupted, StopSignals, signal_name
from .strategies import Pass
from .updates import partial_gradient

PERIODIC_CALIBRATION_BATCHES = 5  # the same before each periodic evaluation of a layerwise run


@dataclass
class TrainResult:
    out: Path
    model_path: Path | None  # None when the run stopped early (stop_after)
    metrics: list[dict]  # final per-member metrics (empty when stopped early)
    steps: int  # steps done
    total_steps: int
    wall_time_s: float
    metric: str  # "accuracy" or "bits_per_byte"
    member_params: dict[str, int] = field(default_factory=dict)  # member key -> parameters
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

    def note(self, text: str) -> None:
        """A line about the run itself (e.g. what --overwrite removed)."""


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run (or resume) one training run; returns the final metrics per member.

    Rank 0 holds the run folder's lock for the whole run, so a second run into it is refused
    (``zoo.fileio.FolderInUse``). SIGTERM or SIGINT ends the run after the current step with a
    checkpoint (``TrainResult.stopped_by``); a second one, or one outside the loop, raises
    :class:`~training.signals.Interrupted` and leaves the previous checkpoint.
    """
    structure = config.check()
    ctx = distributed.setup(config.dist.device, config.dist.dist_timeout)
    if ctx.restart and (Path(config.out) / CHECKPOINT_NAME).exists():
        config = dataclasses.replace(config, resume=True, overwrite=False)  # torchrun restarted it (--max-restarts)
    lost = None
    try:
        with (
            StopSignals() as signals,
            locked_folder(config.out, "zoo train") if ctx.is_main else contextlib.nullcontext(),
        ):
            trainer = None
            try:
                trainer = Trainer(config, ctx, reporter or Reporter(), signals, structure)
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


class Trainer(Setup):
    """One run's loop over what :class:`~training.setup.Setup` built: steps, periodic evaluation
    and checkpoints, the final calibration, evaluation and weights file."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: distributed.DistContext,
        reporter: Reporter,
        signals: StopSignals | None = None,
        structure: zoo.ElasticModel | None = None,
    ):
        super().__init__(config, ctx, signals, structure)
        self.reporter = reporter

    # ----- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        end = self.total_steps if cfg.loop.stop_after is None else min(cfg.loop.stop_after, self.total_steps)
        described = f"{cfg.model} {cfg.members.strategy} ({len(self.members)} member{'s' * (len(self.members) > 1)})"
        if self.step >= self.total_steps and (self.out / MODEL_FILE).exists():
            return self._already_finished()
        self.signals.deferring = True  # from here a signal lets the step finish, then checkpoints
        if self.ctx.is_main:
            if self.overwritten:
                self.reporter.note(
                    f"--overwrite: removed the old run's {', '.join(self.overwritten)} from {self.out}; "
                    "nothing of it is kept"
                )
            self.reporter.start(self.total_steps, self.step, described, cfg.loop.batch_size)
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
                    if self.step % cfg.loop.eval_every == 0 and self.step < self.total_steps:
                        throughput = interval_steps * cfg.loop.batch_size / (time.perf_counter() - interval_start)
                        self._periodic_evaluation(throughput)
                        interval_start, interval_steps = time.perf_counter(), 0
                    if self.step % cfg.loop.ckpt_every == 0 or self.step == end:
                        self._save_checkpoint()
                    signum = self.ctx.agreed_signal(self.signals.requested)
                    if signum is not None:
                        return self._stop(signum)
                    if self.step >= end:
                        break
            self.signals.deferring = False  # the last checkpoint is written: a signal now stops at once
            self.loader.close()  # its workers are not needed to evaluate and save
            throughput = interval_steps * cfg.loop.batch_size / max(time.perf_counter() - interval_start, 1e-9)
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
        memory_format = torch.channels_last if self.cfg.loop.channels_last else torch.preserve_format
        return inputs.to(self.ctx.device, non_blocking=True, memory_format=memory_format)

    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """One step of ``x ← x - lr · m ⊙ g(x + δ)``. The strategy's members are one choice of
        ``m`` and ``δ``: each pass evaluates its member alone (``set_member`` slices the weights:
        ``δ = -(1 - m) ⊙ x`` as a slice) and the mask is the union of their regions; the update
        policy adds its ``δ`` and narrows ``m`` (:func:`training.updates.partial_gradient`)."""
        plan = self.strategy.plan(self.step)
        self.scheduler.step_update(self.step)
        members = self.masks.union(part.member for part in plan)
        if self.alignment_batch is not None and self.step % self.cfg.loop.log_alignment == 0:
            self._log_alignment(plan, members)
        gradient = lambda: self._gradient(plan, inputs, targets)  # noqa: E731
        losses, mask = partial_gradient(
            self.policy, gradient, members, self.precision.unscaled(gradient, self.policy.params)
        )
        values = self.ctx.mean(torch.stack(losses)).tolist()
        for part, value in zip(plan, values):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss is {value} at step {self.step + 1} (member {part.member}); "
                    f"stopped, {self._last_checkpoint()}"
                )
        self.precision.step(self.optimizer, mask, self.cfg.optim.clip_grad, self.model.parameters())
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
        chunks = self.cfg.loop.accum_steps
        losses: list = [0.0] * len(plan)
        with self.sync_bn.active() if self.sync_bn else contextlib.nullcontext():
            for j, (micro_inputs, micro_targets) in enumerate(zip(inputs.chunk(chunks), targets.chunk(chunks))):
                teacher = None
                for i, part in enumerate(plan):
                    if self.model.active_member != part.member:
                        self.model.set_member(
                            part.member, for_training=True
                        )  # a drawn member trains on batch statistics
                    last = sync and j == chunks - 1 and i == len(plan) - 1
                    with contextlib.nullcontext() if last or not self.ctx.distributed else self.net.no_sync():
                        with self.precision.autocast():
                            logits = self.net(micro_inputs)
                        loss = (
                            distill_loss(logits, teacher)
                            if part.distill
                            else self.cfg.optim.hard_loss(logits, micro_targets)
                        )
                        self.precision.backward(loss / chunks)
                    if i == 0 and len(plan) > 1:
                        teacher = logits.detach()
                    losses[i] = losses[i] + loss.detach() / chunks
        return losses

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
        return (
            f"the last good checkpoint is {self.checkpoint_path} (step {self.checkpoint_step}); "
            "lower --lr or add --clip-grad"
        )

    # ----- evaluation and the end -------------------------------------------------------------
    def _periodic_evaluation(self, throughput: float) -> None:
        if not self.ctx.is_main:
            return
        if (self.cfg.members.space == "layerwise" or self.policy.distorts_statistics) and self.model.uses_batchnorm:
            self._recalibrate(
                PERIODIC_CALIBRATION_BATCHES
            )  # drawn members (or dropped units) skew the running statistics
        records = evaluate(
            self.model,
            self.data.val,
            self.members,
            self.eval_batch_size,
            self.cfg.loop.eval_limit,
            workers=self.workers,
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
        metadata = {"metrics": metrics, "train": self._provenance(), **self.carried}
        path = zoo.save(self.model, self.out / MODEL_FILE, metadata=metadata)
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
            metadata={
                "metrics": metrics,
                "train": {**self._provenance(), "ema_decay": self.cfg.loop.ema_decay},
                **self.carried,
            },
        )
        return metrics

    def _recalibrate(self, num_batches: int, model: zoo.ElasticModel | None = None) -> None:
        """Batch-norm statistics of every trained member from ``num_batches`` training batches."""
        calibration = self._calibration_data()
        for member in self.members:
            inputs = (
                x.to(self.ctx.device)
                for x in batches(calibration, self.cfg.loop.batch_size, limit=num_batches, workers=self.workers)
            )
            zoo.recalibrate_bn(model or self.model, inputs, member)

    @property
    def eval_batch_size(self) -> int:
        return default_batch_size(self.model)

    def _provenance(self) -> dict:
        data: DataBundle = self.data
        info = {
            "config": self.cfg.flags(),
            "strategy": self.cfg.members.strategy,
            "members": [s.to_dict() for s in self.members],
            "steps": self.total_steps,
            "epochs": round(self.total_steps / self.steps_per_epoch, 3),
            "data": absolute_spec(data.spec),  # as typed: config["data"]
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
        params = {member.key: zoo.count_params(self.model, member) for member in self.members}
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
