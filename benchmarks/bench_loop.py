"""`zoo train`'s loop against a hand-written timm-style loop, eager and compiled, side by side.

Loops (all on the same model, data and transforms, batch, optimizer, precision and device):

- ``timm``: the loop timm's ``train.py`` runs, written out by hand: ``for x, y in loader``,
  autocast, ``loss.backward()``, ``optimizer.step()``, ``loss.item()`` and the scheduler's
  ``step_update`` every step (timm's ``create_optimizer_v2`` and ``CosineLRScheduler``);
- ``zoo``: ``training.trainer.train`` (what ``zoo train`` runs) training the full model alone
  (``--strategy separate --width 1``): the same work, plus zoo's bookkeeping;
- ``zoo-compiled``: the same with ``--compile``;
- ``zoo-joint`` and ``zoo-joint-compiled``: the paper's alternating schedule on widths 0.5
  and 1 (two members, so two compiled graphs).

Every loop runs ``--repeats`` times, interleaved, in alternating order; the median is reported,
and each ratio is the median of the ratios within a repeat (runs next to each other in time:
on a shared machine the load drifts between repeats more than within one). Only training steps
are timed, from the end of step ``--skip`` to the last (never set-up, evaluation or saving);
the first-steps column is the first step's extra time, which holds torch.compile's compilation
(each member's first step compiles its graph: ``zoo-joint-compiled`` reports the sum over its
members, minus the steady step time). Compilation is cold on every run (a fresh inductor cache
folder and cleared in-memory caches). Runs alternate their order from one repeat to the next.
On CUDA the peak memory is ``torch.cuda.max_memory_allocated``; with
``--peak-tflops`` the model FLOPs utilisation is ``3 x forward FLOPs (zoo.count_flops) x
samples/s / peak`` (full-model loops only).

    python benchmarks/bench_loop.py --model slim_resnet20 --data digits --img-size 32 --batch-size 64
    python benchmarks/bench_loop.py --model slim_gpt_nano --data stdlib --seq-len 128 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from training import distributed  # noqa: E402
from training.precision import Precision, resolve_amp  # noqa: E402
from training.trainer import Reporter, TrainConfig, Trainer, train  # noqa: E402
from zoo.fileio import atomic_path  # noqa: E402

LOOPS = ("timm", "zoo", "zoo-compiled", "zoo-joint", "zoo-joint-compiled")


class StepClock(Reporter):
    """When each training step ended."""

    def start(self, total_steps: int, done: int, description: str, batch_size: int) -> None:
        self.times = [time.perf_counter()]

    def step(self, step: int, loss: float, lr: float) -> None:
        self.times.append(time.perf_counter())


@dataclass
class Sample:
    seconds_per_step: float
    first_steps_s: float  # the first step of each member, minus that many steady steps
    peak_memory_mb: float | None = None


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float | None:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return statistics.median(values) if values else None


def _config(args, out: Path, loop: str) -> TrainConfig:
    """The run of ``loop``; it stops after ``--steps`` (before the final evaluation: not timed, and long)."""
    joint = loop.startswith("zoo-joint")
    return TrainConfig.from_flags(
        model=args.model, out=str(out), data=args.data, strategy="alternating" if joint else "separate",
        widths=[0.5, 1.0] if joint else [1.0], steps=args.steps + 1, stop_after=args.steps, batch_size=args.batch_size,
        img_size=args.img_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=0,
        eval_every=args.steps + 1, ckpt_every=args.steps + 1, device=args.device, workers=args.workers, amp=args.amp,
        channels_last=args.channels_last, compile=loop.endswith("compiled"), seed=0,
        **({"compile_backend": args.compile_backend} if loop.endswith("compiled") else {}),
    )  # fmt: skip


def _memory_start(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory_peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _sample(args, times: list[float], members: int) -> Sample:
    """Steady seconds per step from the step times; the first ``members`` steps hold compilation."""
    steps = [b - a for a, b in zip(times, times[1:])]
    steady = (times[-1] - times[args.skip]) / (len(times) - 1 - args.skip)
    first = max(0.0, sum(steps[:members]) - members * steady)
    return Sample(steady, first, _memory_peak(args.device))


def run_zoo(args, workdir: Path, loop: str) -> Sample:
    clock = StepClock()
    _memory_start(args.device)
    torch._dynamo.reset()
    with temporary_cache_dir(tempfile.mkdtemp(dir=workdir)):  # compiled from scratch, as a user's first run
        train(_config(args, Path(tempfile.mkdtemp(dir=workdir)), loop), clock)
    return _sample(args, clock.times, 2 if loop.startswith("zoo-joint") else 1)


def run_timm(args, workdir: Path) -> Sample:
    """The hand-written loop on the model and data a zoo run builds (same init, same dataset)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    config = _config(args, Path(tempfile.mkdtemp(dir=workdir)), "zoo")
    ctx = distributed.setup(config.dist.device)
    trainer = Trainer(config, ctx, Reporter())  # builds the model and the data, trains nothing
    model, data, cfg = trainer.model, trainer.data, trainer.cfg.optim
    del trainer
    device = ctx.device
    precision = Precision(resolve_amp(args.amp, device), device)
    if cfg.optimizer == "sgd":
        optimizer = create_optimizer_v2(
            model, "momentum", lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
    else:
        optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.steps, t_in_epochs=False)
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)  # fmt: skip
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    _memory_start(args.device)
    model.train()
    times, done = [time.perf_counter()], 0
    while done < args.steps:
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
            done += 1
            scheduler.step_update(done)
            times.append(time.perf_counter())
            if done == args.steps:
                break
    return _sample(args, times, 1)


def probe(args, workdir: Path) -> tuple[str, int]:
    """The data's kind and the forward FLOPs of one training sample of the full model (counted
    on CPU: the count needs no device)."""
    config = _config(args, Path(tempfile.mkdtemp(dir=workdir)), "zoo")
    config.dist.device, config.loop.amp, config.loop.channels_last = "cpu", None, False
    trainer = Trainer(config, distributed.setup("cpu"), Reporter())
    return trainer.data.kind, zoo.count_flops(trainer.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="slim_resnet20")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--skip", type=int, default=6, help="steps not timed at the start of each run (compilation, warm-up)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default=None, help="bf16 | fp16 | none (default: zoo's: bf16 on CUDA, none on CPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, of {', '.join(LOOPS)}")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense peak (bf16 on a GPU): reports MFU"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the table here (markdown) and the numbers beside it (.json)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loops = args.loops.split(",")
    unknown = [loop for loop in loops if loop not in LOOPS]
    if unknown:
        parser.error(f"unknown loops {unknown}; choose from {', '.join(LOOPS)}")
    results = {loop: Result() for loop in loops}
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        workdir = Path(tmp)
        kind, flops = probe(args, workdir)
        for repeat in range(args.repeats):
            for loop in loops if repeat % 2 == 0 else loops[::-1]:
                sample = run_timm(args, workdir) if loop == "timm" else run_zoo(args, workdir, loop)
                results[loop].samples.append(sample)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {loop}: {1e3 * sample.seconds_per_step:.1f} ms/step, "
                    f"first steps +{sample.first_steps_s:.1f} s",
                    flush=True,
                )

    summary = summarise(args, kind, flops, results)
    text = render(summary)
    print(text)
    if args.out:
        with atomic_path(args.out.with_suffix(".json")) as tmp_file:
            tmp_file.write_text(json.dumps(summary, indent=1))
        with atomic_path(args.out) as tmp_file:
            tmp_file.write_text(text)


def summarise(args, kind: str, flops: int, results: dict[str, Result]) -> dict:
    """Everything measured, every run's numbers included (what the table is rendered from)."""
    tokens = args.seq_len if kind == "tokens" else 1
    unit = "tokens" if kind == "tokens" else "images"
    amp = resolve_amp(args.amp, torch.device(args.device))
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    loops = {}
    for loop, result in results.items():
        step = result.median("seconds_per_step")
        full_model = not loop.startswith("zoo-joint")  # a joint run's core steps cost less than the count
        loops[loop] = {
            "ms_per_step_runs": [round(1e3 * s.seconds_per_step, 2) for s in result.samples],
            "first_steps_s_runs": [round(s.first_steps_s, 2) for s in result.samples],
            "peak_memory_mb": result.median("peak_memory_mb"),
            f"{unit}_per_s": args.batch_size * tokens / step,
            "mfu": 3 * flops * args.batch_size / step / (args.peak_tflops * 1e12)
            if args.peak_tflops and full_model
            else None,
        }
    description = (
        f"`python benchmarks/bench_loop.py --model {args.model} --data {args.data} --batch-size {args.batch_size} ...` "
        f"({args.model}, {args.data}, {f'{args.img_size} px' if unit == 'images' else f'{args.seq_len} bytes'}, "
        f"batch {args.batch_size}, amp {amp}"
        f"{', channels-last' if args.channels_last else ''}, {args.workers} workers; "
        f"median of {args.repeats} runs of {args.steps} steps "
        f"interleaved in alternating order, the first {args.skip} untimed; "
        "ratios are medians of the ratios within a repeat; "
        f"torch {torch.__version__}, {args.device} ({device}), {torch.get_num_threads()} threads)"
    )
    return {
        "description": description,
        "unit": unit,
        "forward_flops_per_sample": flops,
        "args": {k: str(v) for k, v in vars(args).items()},
        "loops": loops,
    }


def _paired(summary: dict, base: str, loop: str) -> float | None:
    """The median over repeats of base's step time over loop's (both measured in the same repeat)."""
    if base not in summary["loops"]:
        return None
    pairs = zip(summary["loops"][base]["ms_per_step_runs"], summary["loops"][loop]["ms_per_step_runs"])
    return statistics.median(b / s for b, s in pairs)


def render(summary: dict) -> str:
    unit = summary["unit"]
    rows = []
    for loop, numbers in summary["loops"].items():
        versus_timm = _paired(summary, "timm", loop)
        versus_eager = _paired(summary, loop.removesuffix("-compiled"), loop) if loop.endswith("-compiled") else None
        memory, mfu = numbers["peak_memory_mb"], numbers["mfu"]
        rows.append(
            f"| {loop} | {statistics.median(numbers['ms_per_step_runs']):.1f} | {numbers[f'{unit}_per_s']:,.0f} | "
            f"{'-' if versus_timm is None else f'**{versus_timm:.2f}**'} | "
            f"{'-' if versus_eager is None else f'**{versus_eager:.2f}**'} | "
            f"{statistics.median(numbers['first_steps_s_runs']):.1f} | {'-' if memory is None else f'{memory:,.0f}'} | "
            f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} |"
        )
    return "\n".join([
        summary["description"],
        "",
        f"| loop | ms / step | {unit} / s | speed vs timm loop | compiled vs eager | first steps (s) | "
        "peak memory (MB) | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
