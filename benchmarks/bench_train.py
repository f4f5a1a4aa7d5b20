"""Training speed, measured side by side in one process.

1. ``zoo train``'s loop (``training.trainer.train``) against a minimal hand-written PyTorch
   loop doing the same work: the same model at width 1.0, the same data, batch, optimizer
   (SGD, momentum 0.9, weight decay) and full steps only. Target: ratio >= 0.9.
2. The cost of one step of each joint strategy relative to a full-only step (the four widths
   0.25, 0.5, 0.75, 1 of the family).
3. The masked optimizer step against the plain one, on a core (width 0.5) step.

Every configuration runs once unmeasured first (kernel set-up for every shape happens then),
then ``--repeats`` times interleaved; the median is reported. Only training steps are timed
(from the end of the ``--skip`` th step to the last), never set-up, evaluation or saving.

    python benchmarks/bench_train.py            # writes benchmarks/results/train.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from training.data import load_data  # noqa: E402
from training.masking import MaskCache, masked_step  # noqa: E402
from training.trainer import Reporter, TrainConfig, train  # noqa: E402
from zoo.fileio import atomic_path  # noqa: E402

MODEL = "slim_resnet20"


class StepClock(Reporter):
    """Records when each training step ended."""

    def start(self, total_steps: int, done: int, description: str, batch_size: int) -> None:
        self.times: list[float] = []

    def step(self, step: int, loss: float, lr: float) -> None:
        self.times.append(time.perf_counter())


def library_seconds_per_step(args, workdir: Path, strategy: str, widths: list[float]) -> float:
    """Seconds per step of ``zoo train``'s loop, from step ``skip`` to the last."""
    clock = StepClock()
    out = Path(tempfile.mkdtemp(dir=workdir))
    config = TrainConfig.from_flags(
        model=MODEL, out=str(out), strategy=strategy, widths=widths, steps=args.steps, batch_size=args.batch_size,
        img_size=args.img_size, optimizer="sgd", lr=0.05, warmup_steps=0, eval_every=args.steps + 1,
        ckpt_every=args.steps + 1, seed=0,
    )  # fmt: skip
    train(config, clock)
    return (clock.times[-1] - clock.times[args.skip - 1]) / (len(clock.times) - args.skip)


def hand_written_seconds_per_step(args) -> float:
    """The same work as a plain PyTorch loop: the textbook ``for x, y in loader`` step."""
    data = load_data("digits", img_size=args.img_size)
    torch.manual_seed(0)
    model = zoo.create_model(MODEL, num_classes=data.num_classes, in_chans=1, img_size=args.img_size, widths=[1.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model.train()
    times, done = [], 0
    while done < args.steps:
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter())
            done += 1
            if done == args.steps:
                break
    return (times[-1] - times[args.skip - 1]) / (len(times) - args.skip)


def masked_step_overhead(args) -> tuple[float, float]:
    """(plain optimizer step, masked optimizer step) in seconds, on a width-0.5 core step."""
    torch.manual_seed(0)
    model = zoo.create_model(MODEL, num_classes=10, in_chans=1, img_size=args.img_size, widths=[0.5, 1.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    masks = MaskCache(model).member(zoo.Member(0.5))
    model.set_member(width=0.5)
    inputs, targets = (
        torch.randn(args.batch_size, 1, args.img_size, args.img_size),
        torch.randint(0, 10, (args.batch_size,)),
    )
    F.cross_entropy(model(inputs), targets).backward()  # gradients stay; only the step is timed
    timings = {}
    for name, step in (("plain", optimizer.step), ("masked", lambda: masked_step(optimizer, masks))):
        step()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                step()
            samples.append((time.perf_counter() - start) / 20)
        timings[name] = statistics.median(samples)
    return timings["plain"], timings["masked"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="steps not timed at the start of each run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=16, help="digits upsampled to this size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [0.25, 0.5, 0.75, 1.0]
    runs = {
        "hand-written loop": lambda: hand_written_seconds_per_step(args),
        "zoo train loop": lambda: library_seconds_per_step(args, workdir, "separate", [1.0]),
        **{
            f"zoo train {s}": (lambda s=s: library_seconds_per_step(args, workdir, s, widths))
            for s in ("alternating", "sandwich", "all", "random")
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        for run in runs.values():  # unmeasured: every shape's kernels get set up
            run()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                samples[name].append(run())
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    plain, masked = masked_step_overhead(args)

    full = seconds["zoo train loop"]
    lines = [
        "# Training speed",
        "",
        f"`python benchmarks/bench_train.py` ({MODEL}, digits at {args.img_size}x{args.img_size}, "
        f"batch {args.batch_size}, SGD; "
        f"median of {args.repeats} interleaved runs of {args.steps} steps, the first {args.skip} untimed; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "",
        "| loop | ms / step | samples / s | ratio |",
        "|---|---:|---:|---:|",
        f"| hand-written PyTorch loop (width 1.0) | {1000 * seconds['hand-written loop']:.1f} | "
        f"{args.batch_size / seconds['hand-written loop']:.0f} | 1.00 |",
        f"| `zoo train` loop, full steps only (width 1.0) | {1000 * full:.1f} | {args.batch_size / full:.0f} | "
        f"**{seconds['hand-written loop'] / full:.2f}** (throughput vs hand-written; target >= 0.9) |",
        "",
        "Joint steps (members: widths 0.25, 0.5, 0.75, 1), cost of one step relative to a full-only step:",
        "",
        "| strategy | ms / step | x full step |",
        "|---|---:|---:|",
    ]
    for strategy in ("alternating", "sandwich", "all", "random"):
        value = seconds[f"zoo train {strategy}"]
        lines.append(f"| {strategy} | {1000 * value:.1f} | {value / full:.2f} |")
    lines += [
        "",
        f"Masked optimizer step on a width-0.5 core step: {1e3 * masked:.2f} ms vs {1e3 * plain:.2f} ms plain "
        f"({masked / plain:.2f}x the optimizer step; {1e3 * (masked - plain):.2f} ms = "
        f"{100 * (masked - plain) / full:.1f}% of a full training step).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with atomic_path(args.out) as tmp_file:
        tmp_file.write_text(text)


if __name__ == "__main__":
    main()
