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
from typing import Callable, Iterable

import onnxruntime as ort
import torch

from zoo import ElasticModel, Member, Subnet, WeightsSource
from zoo.fileio import atomic_path

from .onnx_export import export_member

RUNTIMES = ("pytorch", "onnxruntime")
METRICS = ("accuracy", "bits_per_byte")
PAUSE_S = 0.003  # untimed, before each run: longer than an idle OpenMP thread spins


@dataclass
class MemberResult:
    """What one member costs and (when the weights file knows it) how good it is."""

    subnet: Subnet
    params: int
    flops: int
    metric_name: str | None = None
    metric: float | None = None
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # runtime -> batch -> median

    def to_dict(self) -> dict:
        return {
            "subnet": self.subnet.to_dict(),
            "params": self.params,
            "flops": self.flops,
            "metric_name": self.metric_name,
            "metric": self.metric,
            "latency_ms": {runtime: {str(b): ms for b, ms in by_batch.items()} for runtime, by_batch in self.latency_ms.items()},
        }


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each callable, run in turn once per repeat after ``warmup``."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
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


def bench_member(member: Member, batch_sizes: Iterable[int], repeats: int, threads: int, workdir: Path) -> MemberResult:
    """Export a sliced member (verified against PyTorch), then time both runtimes side by side.

    The exporter merges low-rank layers whose dense form is cheaper, in place, so PyTorch
    runs the very network that the ONNX file holds.
    """
    exported = export_member(member, workdir / f"{member.subnet.key}.onnx")
    model = member.model.eval()
    result = MemberResult(member.subnet, exported.num_params, exported.flops, *member_metric(member.metadata))
    session = onnx_session(exported.path, threads)
    torch.manual_seed(0)
    for batch_size in batch_sizes:
        x = model.example_input(batch_size)  # full images, or a full context of tokens
        x_numpy = x.numpy()
        with torch.inference_mode():
            medians = time_interleaved(
                {"pytorch": lambda: model(x), "onnxruntime": lambda: session.run(["logits"], {"input": x_numpy})},
                repeats,
            )
        for runtime, ms in medians.items():
            result.latency_ms.setdefault(runtime, {})[batch_size] = ms
    return result


def choose_subnets(model: ElasticModel, widths: list[float] | None, ranks: list[float] | None) -> list[Subnet]:
    """The members to measure: the file's trained grid, or the grid of the given values."""
    if not widths and not ranks:
        return list(model.subnets)
    widths = widths or sorted({s.width for s in model.subnets})
    rank_values: list[float | None] = list(ranks) if ranks else sorted({s.rank for s in model.subnets}, key=lambda r: r or 0.0)
    subnets = sorted({model.resolve_subnet(w, r) for w in widths for r in rank_values}, key=lambda s: (s.width, s.rank or 0.0))
    untrained = [s for s in subnets if model.uses_batchnorm and s not in model.subnets]
    if untrained:
        raise ValueError(
            f"{model.arch} has batch-norm statistics only for its trained members ({'; '.join(map(str, model.subnets))}), "
            f"not for {untrained[0]}; bench one of those, or write a recalibrated member with `zoo slice --calibrate DATA` and bench that file"
        )
    return subnets


def bench_family(
    source: WeightsSource,
    subnets: list[Subnet],
    batch_size: int = 8,
    repeats: int = 10,
    threads: int | None = None,
) -> list[MemberResult]:
    """Measure every member in ``subnets`` of the family in ``source`` at batch 1 and ``batch_size``."""
    if repeats < 1 or batch_size < 1:
        raise ValueError("repeats and batch size must be at least 1")
    threads = threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="zoo-bench-") as workdir:
            return [
                bench_member(source.member(subnet), sorted({1, batch_size}), repeats, threads, Path(workdir))
                for subnet in subnets
            ]
    finally:
        torch.set_num_threads(previous_threads)


def member_label(subnet: Subnet) -> str:
    return f"w{subnet.width:g}" + ("" if subnet.rank is None else f" r{subnet.rank:g}")


def check_plot_path(path: str | os.PathLike) -> None:
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"the plot is written as PNG; give a path ending in .png, got {path}")


def plot_results(results: list[MemberResult], path: str | os.PathLike, title: str) -> Path:
    """Metric (or FLOPs when no metric is known) against batch-1 latency, one point per member."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_plot_path(path)
    with_metric = all(r.metric is not None for r in results) and len({r.metric_name for r in results}) == 1
    ys = [r.metric if with_metric else r.flops / 1e6 for r in results]
    ylabel = results[0].metric_name.replace("_", " ") if with_metric else "MFLOPs (no metric recorded)"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for runtime, marker in zip(RUNTIMES, ("o", "s")):
        xs = [r.latency_ms[runtime][1] for r in results]
        ax.plot(xs, ys, marker=marker, linestyle="none", label=runtime)
        for x, y, r in zip(xs, ys, results):
            ax.annotate(member_label(r.subnet), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency at batch 1 (ms, median)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"
