"""`zoo run` (an exported file in onnxruntime, no torch) and `zoo bench` (members side by side)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .common import PRETRAINED, check_data_path, command, readable_weights
from .members import MEMBER, parse_members


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy")
RUN_BATCH = 32  # images per onnxruntime call: a large folder is classified in pieces


@command("run", epilog="Example: zoo run small.onnx photo.png; or zoo run member.onnx --prompt 'Once upon'")
def run_command(
    file: Path = typer.Argument(..., help="An .onnx file written by `zoo export`."),
    inputs: Optional[List[str]] = typer.Argument(
        None, help="Image files, folders of images or .npy arrays (classifiers); or the prompt (language models)."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The text to continue (language models)."),
    device: Device = typer.Option(Device.cpu, "--device", help="Execution provider; cuda fails unless it really runs."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes to print per image."),
    max_bytes: int = typer.Option(200, "--max-bytes", min=0, help="Bytes to generate (byte language models)."),
    max_tokens: int = typer.Option(
        64, "--max-tokens", min=0, help="Tokens to generate (language models that record a tokenizer)."
    ),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy; above 0 samples."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (same seed, same text)."),
    member: Optional[str] = typer.Option(
        None,
        "--member",
        metavar="KEY_OR_JSON",
        help="A family file's member (zoo export --family): its key (w0p5), JSON ('{\"width\": 0.5}') or width; "
        "default: the largest. `zoo info FILE` lists them.",
    ),
) -> None:
    """Run an exported member with onnxruntime: one line of top-k classes per image, or text from a prompt
    (decoded with the tokenizer the file records, or as bytes)."""
    from export.runtime import Predictor

    predictor = Predictor(file, device=device.value, member=_member_choice(member))
    inputs = list(inputs or [])
    if predictor.kind == "tokens":
        given = len(inputs) + (prompt is not None)
        if given != 1:
            raise ValueError(f"{file} is a language model: give one prompt (--prompt TEXT), got {given}")
        text = prompt if prompt is not None else inputs[0]
        if predictor.has_tokenizer:
            typer.echo(text + predictor.generate_text(text, max_tokens, temperature=temperature, seed=seed))
            return
        new = predictor.generate_bytes(text, max_new_bytes=max_bytes, temperature=temperature, seed=seed)
        typer.echo((text.encode("utf-8") + new).decode("utf-8", errors="replace"))
        return
    if prompt is not None or not inputs:
        raise ValueError(f"{file} is an image classifier: give image files, folders or .npy arrays (not --prompt)")
    images = [image for argument in inputs for image in _expand(Path(argument))]
    for start in range(0, len(images), RUN_BATCH):
        chunk = images[start : start + RUN_BATCH]
        for (name, _), best in zip(chunk, predictor.top_k([array for _, array in chunk], k=top_k)):
            typer.echo(f"{name}: " + ", ".join(f"{label} {probability:.4f}" for label, probability in best))


def _member_choice(value: Optional[str]):
    """``--member`` of `zoo run`: a JSON member, a uniform width, or a member's key."""
    if value is None:
        return None
    if value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--member {value!r} is not valid JSON ({err.msg} at character {err.pos})") from None
    try:
        return float(value)
    except ValueError:
        return value


def _expand(path: Path) -> list[tuple[str, object]]:
    """(name, image) pairs of one argument: an image file, a .npy image or batch, or a folder of them."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return [pair for p in files for pair in _expand(p)]
    if not path.is_file():
        raise FileNotFoundError(f"no such image file or folder: {path}")
    if path.suffix.lower() != ".npy":
        return [(str(path), str(path))]
    array = _read_npy(path)
    if array.ndim != 4:
        return [(str(path), array)]
    return [(f"{path}[{i}]", image) for i, image in enumerate(array)]


def _read_npy(path: Path):
    """A .npy image or batch of images, never unpickled."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{path} is not a readable .npy array ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None


BENCH_WIDTHS = typer.Option(None, "--width", help="Widths to measure (repeatable); default: the file's grid.")
BENCH_RANKS = typer.Option(None, "--rank", help="Ranks to measure (repeatable, low-rank families).")
BENCH_THREADS = typer.Option(None, "--threads", min=1, help="Threads for both runtimes; default: torch's.")


@command("bench", epilog="Example: zoo bench runs/resnet20/model.safetensors --plot bench.png")
def bench_command(
    weights: Path = typer.Argument(..., help="A zoo weights file (.safetensors); a catalogue name with --pretrained."),
    pretrained: bool = PRETRAINED,
    width: Optional[List[float]] = BENCH_WIDTHS,
    rank: Optional[List[float]] = BENCH_RANKS,
    member: Optional[List[str]] = MEMBER,
    calibrate: Optional[str] = typer.Option(
        None,
        "--calibrate",
        metavar="DATA",
        help="Data for the batch-norm statistics of untrained members; default: the data the file records.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="The larger batch, measured next to batch 1."),
    repeats: int = typer.Option(10, "--repeats", min=1, help="Timed runs per runtime and batch (median reported)."),
    threads: Optional[int] = BENCH_THREADS,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write metric (or FLOPs) against latency to this PNG."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Measure every member: parameters, FLOPs, latency in PyTorch (sliced) and onnxruntime."""
    path = readable_weights(weights, pretrained, "bench")
    chosen_members = parse_members(member)
    check_data_path(calibrate, "--calibrate")
    import torch

    from export.benchmark import bench_family, check_plot_path, plot_results, slower_members
    from zoo import WeightsSource
    from zoo.members import calibrate_members, select_members

    from .export_commands import CalibrationData

    source = WeightsSource.open(path)
    model = source.model
    members = select_members(model, width, rank, chosen_members)
    data = CalibrationData(calibrate, model)
    calibrate_members(model, members, data.bn_batches() if data.spec else None)
    threads = threads or torch.get_num_threads()
    if plot is not None:
        check_plot_path(plot)  # before minutes of measuring, not after
    with _BenchProgress(f"benchmarking {model.arch} ({len(members)} members)") as progress:
        results = bench_family(source, members, batch_size, repeats, threads, progress)
    if plot is not None:
        plot_results(results, plot, f"{model.arch} (threads={threads})")
    slower = slower_members(model, results)
    if json_output:
        report = {
            "weights": str(weights),
            "arch": model.arch,
            "threads": threads,
            "batch_sizes": sorted({1, batch_size}),
            "repeats": repeats,
            "plot": None if plot is None else str(plot),
            "members": [r.to_dict() for r in results],
            "slower_than_container": slower,
        }
        typer.echo(json.dumps(report, indent=2))
        return
    _print_table(model.arch, results, batch_size, threads, repeats)
    _print_slower(slower)
    if plot is not None:
        typer.echo(f"plot: {plot}")


class _BenchProgress:
    """A bar on stderr while `zoo bench` exports and times (a terminal only: logs stay as they were)."""

    def __init__(self, description: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        self.bar = Progress(*columns, console=console, transient=True) if console.is_terminal else None
        self.description = description

    def __enter__(self):
        if self.bar is None:
            return None
        self.task = self.bar.add_task(self.description, total=None)
        self.bar.start()
        return self.update

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_slower(slower: list[dict]) -> None:
    """One warning per member measured slower than a member containing it."""
    from zoo import Member

    for f in slower:
        small, big = Member.from_dict(f["member"]), Member.from_dict(f["container"])
        typer.echo(
            f"smaller is slower ({f['runtime']}, batch {f['batch']}): {small} measured {f['member_ms']:.3f} ms, "
            f"more than {big} which contains it ({f['container_ms']:.3f} ms)"
        )


def _print_table(arch: str, results, batch_size: int, threads: int, repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from export.benchmark import member_label
    from zoo.search import short_count

    batches = sorted({1, batch_size})
    table = Table(title=f"{arch}: median of {repeats} runs, threads={threads}, latency in ms", box=None)
    for column in ("member", "params", "FLOPs", "metric"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for b in batches:
        table.add_column(f"torch b{b}", justify="right")
        table.add_column(f"ort b{b}", justify="right")
    table.add_column("ort/torch b1", justify="right")
    for r in results:
        metric = "-" if r.metric is None else f"{r.metric:.4g} {r.metric_name}"
        latencies = [f"{r.latency_ms[rt][b]:.2f}" for b in batches for rt in ("pytorch", "onnxruntime")]
        ratio = r.latency_ms["onnxruntime"][1] / r.latency_ms["pytorch"][1]
        table.add_row(
            member_label(r.member), short_count(r.params), short_count(r.flops), metric, *latencies, f"{ratio:.2f}x"
        )
    Console(width=160).print(table)
