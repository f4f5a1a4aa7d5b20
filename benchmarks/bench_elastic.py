"""What does running a member *inside* its family cost, next to the member sliced out?

For the smallest variant of each family, one training step (forward + backward) is timed for:
the elastic family at width 1.0 and the sliced member at 1.0 (the elastic layers must add
nothing when nothing is sliced: target <= 1.05), the family at width 0.5 and the sliced member
at 0.5 (slicing weights on the fly: target <= 1.10), and the sliced 0.5 member against the
sliced 1.0 member, next to their FLOP ratio (zoo.count_flops).

The machine may be shared, so the clock is this process's CPU time (time spent waiting for
other processes is not counted); the configurations of a family take turns within every repeat,
starting from a different one each time, and every ratio is the median of the ratios of one
repeat, so a change in load hits both sides of a ratio alike. Results go to stdout and
benchmarks/results/elastic.md.

    python benchmarks/bench_elastic.py [--repeats 21] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.fileio import atomic_path

RESULTS = Path(__file__).resolve().parent / "results" / "elastic.md"

# The smallest variant of each family: (creation arguments, batch size).
CASES: dict[str, tuple[dict, int]] = {
    "slim_resnet20": ({"img_size": 32, "num_classes": 10}, 64),
    "slim_resnet18": ({"img_size": 112}, 16),
    "slim_mobilenetv2": ({"img_size": 112}, 16),
    "slim_vit_tiny": ({"img_size": 32}, 32),
    "slim_gpt_nano": ({"context_length": 128}, 16),
}
FULL_TARGET, HALF_TARGET = 1.05, 1.10


def train_step(model: zoo.ElasticModel, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).float().square().mean().backward()


def step_seconds(
    runs: dict[str, tuple[zoo.ElasticModel, float]], x: torch.Tensor, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """CPU seconds of every timed training step of each (model, width), in repeat order."""
    keys = list(runs)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(warmup + repeats):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            model, width = runs[key]
            model.set_member(width=width)
            start = time.process_time()
            train_step(model, x)
            if i >= warmup:
                times[key].append(time.process_time() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches, to show what the elastic layers add."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_added(family: zoo.ElasticModel, member: zoo.ElasticModel, width: float, x: torch.Tensor) -> str:
    """The aten ops a training step of ``family`` at ``width`` runs beyond its sliced member's."""
    counts = []
    for model in (family, member):
        model.set_member(width=width)
        with OpCounter() as counter:
            train_step(model, x)
        counts.append(counter.ops)
    extra = counts[0] - counts[1]
    return ", ".join(f"{n} {op}" for op, n in extra.most_common()) or "none"


def _input_text(model: zoo.ElasticModel, x: torch.Tensor) -> str:
    if model.input_kind == "tokens":
        return f"{x.shape[0]} x {x.shape[1]} tokens"
    return f"{x.shape[0]} x {'x'.join(str(n) for n in x.shape[1:])}"


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:.3f} {'ok' if ratio <= target else 'MISSED'}"


def bench_family(name: str, repeats: int, warmup: int) -> list[str]:
    """One table row: median CPU ms per step, the three ratios, and the ops slicing adds."""
    create_args, batch = CASES[name]
    torch.manual_seed(0)
    family = zoo.create_model(name, **create_args).train()
    sliced = {w: zoo.slice(family, width=w).train() for w in (1.0, 0.5)}
    x = family.example_input(batch)  # images at img_size, tokens at context_length
    runs = {
        "elastic@1": (family, 1.0),
        "sliced@1": (sliced[1.0], 1.0),
        "elastic@0.5": (family, 0.5),
        "sliced@0.5": (sliced[0.5], 0.5),
    }
    times = step_seconds(runs, x, repeats, warmup)
    flop_ratio = zoo.count_flops(sliced[0.5]) / zoo.count_flops(sliced[1.0])
    added = {w: ops_added(family, sliced[w], w, x[:2]) for w in (1.0, 0.5)}
    return [
        name,
        _input_text(family, x),
        *(f"{1000 * statistics.median(times[k]):.1f}" for k in runs),
        _verdict(median_ratio(times["elastic@1"], times["sliced@1"]), FULL_TARGET),
        _verdict(median_ratio(times["elastic@0.5"], times["sliced@0.5"]), HALF_TARGET),
        f"{median_ratio(times['sliced@0.5'], times['sliced@1']):.3f}",
        f"{flop_ratio:.3f}",
        added[1.0],
        added[0.5],
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 keeps ratios steady on a shared machine)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)

    registered = set(zoo.list_models())
    names = [n for n in CASES if n in registered]
    skipped = [n for n in CASES if n not in registered]
    header = [
        "model",
        "input (batch x shape)",
        "elastic@1 ms",
        "sliced@1 ms",
        "elastic@0.5 ms",
        "sliced@0.5 ms",
        f"elastic/sliced @1 (target <= {FULL_TARGET})",
        f"elastic/sliced @0.5 (target <= {HALF_TARGET})",
        "time sliced 0.5/1.0",
        "FLOPs sliced 0.5/1.0",
        "ops elastic adds @1",
        "ops elastic adds @0.5",
    ]
    rows = []
    for name in names:
        rows.append(bench_family(name, args.repeats, args.warmup))
        print(f"done: {name}", flush=True)

    table = markdown_table(header, rows)
    context = (
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"CPU ms per forward+backward step (train mode), median of {args.repeats} after {args.warmup} warm-up; "
        "configurations interleaved, ratios are medians of per-repeat ratios; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    skipped_text = f"\nNot registered, skipped: {', '.join(skipped)}.\n" if skipped else ""
    text = f"# Elastic family vs sliced member: training-step time\n\n{context}\n\n{table}\n{skipped_text}"
    print(f"\n{text}")
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
