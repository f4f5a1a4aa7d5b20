"""Measuring the members of a family: size, FLOPs, latency in PyTorch and onnxruntime.

Every member is measured as what a user would deploy: the *sliced* network (``zoo.slice``),
never the elastic one with its slicing ops, in PyTorch eager mode and as an exported ONNX
file in onnxruntime. The two runtimes are timed alternately, repeat by repeat, with the
same fixed thread count, so that noise on a shared machine hits both alike; the reported
latency is the median. Idle worker threads must not steal the cores from the other runtime:
onnxruntime's threads do not spin between runs, and a short untimed pause before each run
lets PyTorch's OpenMP threads go to sleep (spinning threads slowed the other runtime by 10x).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable

import onnxruntime as ort
import torch

from zoo import Member, SlicedMember, WeightsSource
from zoo.fileio import atomic_path
from zoo.search import place_labels

from .onnx_export import export_member

RUNTIMES = ("pytorch", "onnxruntime")
METRICS = ("accuracy", "bits_per_byte")
PAUSE_S = 0.003  # untimed, before each run: longer than an idle OpenMP thread spins


@dataclass
class MemberResult:
    """What one member costs and (when the weights file knows it) how good it is."""

    member: Member
    params: int
    flops: int
    metric_name: str | None = None
    metric: float | None = None
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # runtime -> batch -> median

    def to_dict(self) -> dict:
        return {
            "subnet": self.member.to_dict(),
            "params": self.params,
            "flops": self.flops,
            "metric_name": self.metric_name,
            "metric": self.metric,
            "latency_ms": {
                runtime: {str(b): ms for b, ms in by_batch.items()} for runtime, by_batch in self.latency_ms.items()
            },
        }


def time_interleaved(
    runs: dict[Hashable, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[Hashable, float]:
    """Median milliseconds of each callable (by ``clock``: wall time unless told otherwise).

    Each callable is first warmed up on its own, ``warmup`` runs back to back (its first runs
    pay for allocation and cold caches); then every callable runs once per repeat, in turn, so
    that a slow spell of a shared machine hits all of them alike instead of whichever ran then.
    ``progress(r)`` is told each finished repeat.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[Hashable, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, run in runs.items():
            time.sleep(PAUSE_S)
            start = clock()
            run()
            samples[name].append(clock() - start)
        if progress is not None:
            progress(repeat + 1)
    return {name: 1000.0 * statistics.median(times) for name, times in samples.items()}


def onnx_session(path: str | os.PathLike, threads: int) -> ort.InferenceSession:
    """A CPU session with a fixed intra-op thread count and full graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to torch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def member_metric(metadata: dict) -> tuple[str | None, float | None]:
    """The metric a member's metadata records (``metrics`` entries for that member), if any."""
    for entry in metadata.get("metrics") or []:
        for name in METRICS:
            if isinstance(entry, dict) and isinstance(entry.get(name), (int, float)):
                return name, float(entry[name])
    return None, None


def prepare_member(
    sliced: SlicedMember, batch_sizes: Iterable[int], threads: int, workdir: Path
) -> tuple[MemberResult, dict]:
    """Export a sliced member (verified against PyTorch); its result to fill in and its timed
    runs, keyed ``(runtime, batch size)``.

    The exporter merges low-rank layers whose dense form is cheaper, in place, so PyTorch
    runs the very network that the ONNX file holds.
    """
    exported = export_member(sliced, workdir / f"{sliced.member.key}.onnx")
    model = sliced.model.eval()
    result = MemberResult(sliced.member, exported.num_params, exported.flops, *member_metric(sliced.metadata))
    session = onnx_session(exported.path, threads)
    torch.manual_seed(0)
    runs = {}
    for batch_size in batch_sizes:
        x = model.example_input(batch_size)  # full images, or a full context of tokens
        feed = {"input": x.numpy()}
        runs["pytorch", batch_size] = lambda x=x: model(x)
        runs["onnxruntime", batch_size] = lambda feed=feed: session.run(["logits"], feed)
    return result, runs


def bench_family(
    source: WeightsSource,
    members: list[Member],
    batch_size: int = 8,
    repeats: int = 10,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[MemberResult]:
    """Measure every member in ``members`` of the family in ``source`` at batch 1 and ``batch_size``.

    Every member is exported first; then all members, runtimes and batch sizes are timed in
    one interleaved series (:func:`time_interleaved`), so that no member is measured during a
    quieter or busier spell than another. ``progress(done, total)`` counts the exports and the
    repeats.
    """
    total = len(members) + repeats

    def tell(done: int) -> None:
        if progress is not None:
            progress(done, total)

    if repeats < 1 or batch_size < 1:
        raise ValueError("repeats and batch size must be at least 1")
    threads = threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="zoo-bench-") as workdir:
            prepared = []
            for member in members:
                prepared.append(prepare_member(source.member(member), sorted({1, batch_size}), threads, Path(workdir)))
                tell(len(prepared))
            runs = {(i, *key): run for i, (_, member_runs) in enumerate(prepared) for key, run in member_runs.items()}
            with torch.inference_mode():
                medians = time_interleaved(runs, repeats, progress=lambda r: tell(len(members) + r))
    finally:
        torch.set_num_threads(previous_threads)
    results = [result for result, _ in prepared]
    for (i, runtime, batch), ms in medians.items():
        results[i].latency_ms.setdefault(runtime, {})[batch] = ms
    return results


def slower_members(model, results: list[MemberResult]) -> list[dict]:
    """Smaller is never slower, checked on what was measured: every member slower, in a runtime
    at a batch size, than a member that contains it (beyond timing noise)."""
    from zoo.space import slower_containers

    found = []
    for runtime in RUNTIMES:
        for batch in sorted(results[0].latency_ms.get(runtime, {})) if results else []:
            latency = {r.member: r.latency_ms[runtime][batch] for r in results}
            for small, big, small_ms, big_ms in slower_containers(model, latency):
                found.append(
                    {"runtime": runtime, "batch": batch, "member": small.to_dict(), "member_ms": small_ms,
                     "container": big.to_dict(), "container_ms": big_ms}
                )  # fmt: skip
    return found


def member_label(member: Member) -> str:
    return f"w{member.width:g}" + ("" if member.rank is None else f" r{member.rank:g}")


def check_plot_path(path: str | os.PathLike) -> None:
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"the plot is written as PNG; give a path ending in .png, got {path}")


OUTLIER_FACTOR = 10.0  # a latency this many times the median of all is drawn at the axis edge
LABEL_OFFSETS = [
    (5, 4),
    (5, -11),
    (-5, 4),
    (-5, -11),
    (5, 13),
    (5, -20),
    (-5, 13),
    (-5, -20),
    (5, 22),
    (-5, 22),
    (5, -29),
    (-5, -29),
]


def plot_results(results: list[MemberResult], path: str | os.PathLike, title: str) -> Path:
    """Metric (or FLOPs when no metric is known) against batch-1 latency, one point per member
    and runtime; written as PNG."""
    import matplotlib.pyplot as plt

    check_plot_path(path)
    fig = draw_results(results, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def draw_results(results: list[MemberResult], title: str):
    """The figure of :func:`plot_results`. The latency axis fits the data: logarithmic when
    latencies span more than a factor of 8, and a latency above ``OUTLIER_FACTOR`` times the
    median is drawn as an arrow at the edge with its value, so it cannot squeeze the others.
    Labels are placed where they overlap no other label and no point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_metric = all(r.metric is not None for r in results) and len({r.metric_name for r in results}) == 1
    ys = [r.metric if with_metric else r.flops / 1e6 for r in results]
    ylabel = results[0].metric_name.replace("_", " ") if with_metric else "MFLOPs (no metric recorded)"
    latencies = [r.latency_ms[runtime][1] for runtime in RUNTIMES for r in results]
    cap = OUTLIER_FACTOR * statistics.median(latencies)
    inliers = [x for x in latencies if x <= cap]
    low, high = min(inliers), max(inliers)
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    logarithmic = high / low > 8
    if logarithmic:
        ax.set_xscale("log")
        left, right = low / 1.25, high * 1.25
    else:
        pad = 0.08 * (high - low) or 0.1 * high
        left, right = max(0.0, low - pad), high + pad
    if len(inliers) < len(latencies):
        right = high * 1.6 if logarithmic else high + 3 * pad  # room for the arrows
    ax.set_xlim(left, right)
    points, labels = [], []
    order = range(len(results))  # members in the caller's order: the line is the family's trade-off curve
    for runtime, marker, color in zip(RUNTIMES, ("o", "s"), ("tab:blue", "tab:orange")):
        xs = [results[i].latency_ms[runtime][1] for i in order]
        shown = [min(x, right / 1.08 if logarithmic else right - pad) for x in xs]
        ax.plot(shown, [ys[i] for i in order], marker=marker, color=color, linestyle=":", linewidth=0.8, label=runtime)
        for x, x_shown, i in zip(xs, shown, order):
            text = member_label(results[i].member)
            if x > cap:
                ax.plot([x_shown], [ys[i]], marker=">", color=color, markersize=9)
                text += f" ({x:.0f} ms, off scale)"
            points.append((x_shown, ys[i]))
            labels.append(text)
    ax.set_xlabel("latency at batch 1 (ms, median" + (", log scale)" if logarithmic else ")"))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    ax.margins(y=0.15)
    ax.legend(loc="best")
    fig.tight_layout()
    place_labels(fig, ax, points, labels, offsets=LABEL_OFFSETS, markers=points, marker_radius=4, padding=2)
    return fig
