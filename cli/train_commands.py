"""`zoo train` (a family, jointly, with masked updates) and `zoo eval` (metrics per member)."""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .common import PRETRAINED, check_data_path, command, option, readable_weights, takes, zoo_module
from .members import MEMBER, parse_members


class Strategy(str, Enum):
    alternating = "alternating"
    sandwich = "sandwich"
    all = "all"
    random = "random"
    separate = "separate"


class Update(str, Enum):
    full = "full"
    sam = "sam"
    extragradient = "extragradient"
    meprop = "meprop"
    unit_dropout = "unit-dropout"
    rank_dropout = "rank-dropout"


class Space(str, Enum):
    uniform = "uniform"
    layerwise = "layerwise"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Amp(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    none = "none"


# Every `zoo train` option, declared once: the keyword is the training configuration's flag
# (training.config.TrainConfig.from_flags), except the launcher's and --save-dir.
TRAIN_OPTIONS = [
    option(
        "data",
        Optional[str],
        None,
        "digits, stdlib, cifar10:PATH, cifar100:PATH, folder:PATH or text:PATH (a family with a tokenizer: its "
        "tokens); default: digits (images) or stdlib (byte models).",
    ),
    option(
        "strategy",
        Strategy,
        Strategy.alternating,
        "alternating: full and core steps in turn (the paper); sandwich: largest+smallest+random, in-place "
        "distillation; all: every member each step; random: one random member per step; separate: one member alone "
        "(the baseline).",
    ),
    option(
        "widths",
        Optional[List[float]],
        None,
        "Member widths (repeatable); default 0.25 0.5 0.75 1 (dense), 1 (low-rank). Joint strategies add the full "
        "model.",
        flag="--width",
    ),
    option(
        "ranks",
        Optional[List[float]],
        None,
        "Member ranks (repeatable; needs --low-rank); default 0.25 0.5 0.75 1.",
        flag="--rank",
    ),
    option("low_rank", bool, False, "Build the family with factorized (low-rank) layers."),
    option("extra_members", Optional[List[str]], None, MEMBER.help, flag="--member", metavar=MEMBER.metavar),
    option(
        "space",
        Space,
        Space.uniform,
        "random/sandwich: draw from the trained members (uniform), or each stage's/block's width, rank and depth "
        "independently (layerwise, Once-for-All).",
    ),
    option("steps", Optional[int], None, "Optimizer steps; default 600 (images) or 1000 (byte models)."),
    option("epochs", Optional[int], None, "Train for this many epochs instead of --steps."),
    option(
        "batch_size",
        Optional[int],
        None,
        "Global batch (split over processes); default 128 (images) or 16 (byte models).",
    ),
    option("lr", Optional[float], None, "Peak learning rate; default 0.1 (sgd) or 3e-3 (adamw)."),
    option("optimizer", Optional[Optimizer], None, "Default: sgd for images, adamw for byte models."),
    option("weight_decay", Optional[float], None, "Default 5e-4 (sgd) or 0.1 (adamw); never on biases and norms."),
    option("momentum", float, 0.9, "SGD momentum."),
    option("nesterov", bool, False, "Nesterov momentum (sgd)."),
    option("warmup_steps", Optional[int], None, "Linear warmup before the cosine decay; default 5% of the steps."),
    option("clip_grad", Optional[float], None, "Clip the gradient's global norm to this value."),
    option("label_smoothing", float, 0.0, "Label smoothing of the cross-entropy on labels."),
    option("core_prob", float, 0.5, "alternating: fraction of steps that train a core (0.5: full, core, full, ...)."),
    option("num_random", int, 2, "sandwich: random members per step besides the largest and smallest."),
    option(
        "update",
        Update,
        Update.full,
        "The step's mask m and perturbation δ in x ← x - lr·m⊙g(x+δ): full (plain); sam (δ = ρg/‖g‖); extragradient "
        "(δ = -ηg); meprop (m: top-k gradient coordinates); unit-dropout (a random subset of units); rank-dropout (a "
        "random rank prefix, --low-rank).",
    ),
    option("rho", Optional[float], None, "sam: perturbation radius; default 0.05."),
    option("eg_lr", Optional[float], None, "extragradient: look-ahead step η; default 0.01."),
    option(
        "keep",
        Optional[float],
        None,
        "meprop: fraction of gradient coordinates kept (default 0.1); unit-dropout: of units (0.5); rank-dropout: "
        "smallest rank fraction drawn (0.25).",
    ),
    option(
        "meprop_units",
        bool,
        False,
        "meprop: keep the top-k output units (rows by gradient norm) rather than coordinates.",
    ),
    option(
        "nested",
        bool,
        False,
        "unit-dropout: keep a random width prefix of units (in \\[keep, 1]) rather than a random subset.",
    ),
    option(
        "log_alignment",
        Optional[int],
        None,
        "Every N steps log cos(m⊙g(x+δ), g(x)) and the norm ratio on a fixed batch into metrics.jsonl (costs about "
        "three extra forward/backward passes each time).",
    ),
    option("seq_len", int, 256, "Text: context length trained on (bytes, or tokens of a family's tokenizer)."),
    option(
        "img_size",
        Optional[int],
        None,
        "Images: train and evaluate at this size; default: the dataset's own (folders: the model's input size).",
    ),
    option(
        "aa",
        Optional[str],
        None,
        "folder: timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment), original (AutoAugment), "
        "augmix-m5-w4-d2.",
    ),
    option("reprob", float, 0.0, "folder: random-erasing probability (timm's, per-pixel noise)."),
    option(
        "crop_pct",
        Optional[float],
        None,
        "folder: evaluation resizes to img-size / crop-pct and centre-crops; default 0.875.",
    ),
    option("mixup", float, 0.0, "Images: timm Mixup's mixup alpha (0: off); trains on soft targets."),
    option(
        "cutmix",
        float,
        0.0,
        "Images: timm Mixup's cutmix alpha (0: off); with --mixup, each batch uses one of the two.",
    ),
    option(
        "init",
        Optional[Path],
        None,
        "Start from this zoo weights file (same architecture; e.g. a `zoo convert`ed timm model).",
    ),
    option(
        "save_dir",
        Optional[Path],
        None,
        "Also write the trained family in timm's Hub layout here (config.json + model.safetensors).",
    ),
    option("resume", bool, False, "Continue from the checkpoint in --out (pass the original flags)."),
    option(
        "overwrite",
        bool,
        False,
        "Start over in an --out that holds a run: its checkpoint, weights and metrics are removed first.",
    ),
    option("ckpt_every", Optional[int], None, "Checkpoint every N steps; default: at every evaluation."),
    option("eval_every", Optional[int], None, "Evaluate every member every N steps; default: 10 times per run."),
    option(
        "eval_limit",
        Optional[int],
        None,
        "Validation items per periodic evaluation (default 2048 images or 128 byte windows); the final one uses all.",
    ),
    option(
        "stop_after",
        Optional[int],
        None,
        "Stop after this step with a checkpoint (for time-limited jobs); continue with --resume.",
    ),
    option("seed", int, 0, "Seeds the model, the data order and split, and the member choice."),
    option("device", Device, Device.auto, "auto: CUDA if available. cuda without CUDA is an error."),
    option(
        "workers",
        Optional[int],
        None,
        "Data-loading worker processes per training process; default: 0 for data held in memory, a share of the "
        "cores for folders.",
    ),
    # The loop: speed, precision, accumulation, EMA; processes and machines (torch's launcher).
    option(
        "compile",
        bool,
        False,
        "torch.compile the training step: one graph per member, compiled the first time it trains.",
    ),
    option("compile_backend", str, "inductor", "torch.compile backend (with --compile)."),
    option("channels_last", bool, False, "Image models: NHWC weights and inputs (faster convolutions on GPUs)."),
    option(
        "amp",
        Optional[Amp],
        None,
        "Autocast precision of the forward: bf16, fp16 (with a gradient scaler) or none; default bf16 on CUDA, none "
        "on CPU.",
    ),
    option(
        "accum_steps",
        int,
        1,
        "Run each process's share of the --batch-size batch in this many micro-batches (same step, less memory).",
    ),
    option("ema", bool, False, "Keep timm's EMA of the weights; evaluate it and save it as model_ema.safetensors."),
    option("ema_decay", Optional[float], None, "With --ema: the decay, reached after a warmup (default 0.9998)."),
    option("sync_bn", bool, False, "Batch-norm statistics over the global batch, across processes."),
    option(
        "nproc_per_node",
        int,
        1,
        "Data-parallel processes on this machine (gloo on CPU, NCCL on CUDA), started by torch.distributed.run.",
    ),
    option("nnodes", str, "1", "Machines in the run, N or MIN:MAX (elastic); run the same command on each."),
    option(
        "node_rank",
        Optional[int],
        None,
        "This machine's node number; node 0 hosts the rendezvous (default: the machine at --rdzv-endpoint).",
    ),
    option(
        "rdzv_endpoint",
        Optional[str],
        None,
        "HOST:PORT of the rendezvous (node 0's machine, a free port); needed with --nnodes > 1.",
    ),
    option("rdzv_id", str, "zoo", "The run's name in the rendezvous, the same on every machine."),
    # A lost process or node: how long the others wait, and torchrun's restarts (training/launch.py).
    option("dist_timeout", float, 300.0, "Seconds a collective waits for a lost process before every survivor exits."),
    option(
        "max_restarts",
        int,
        0,
        "Restart every process up to N times after a failure or a node lost or joining; they resume from the last "
        "checkpoint.",
    ),
]
LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "max_restarts")
# `zoo train --help` in panels (Typer's rich_help_panel); an option in none is listed under "Options".
PANELS = {
    "Members": ("strategy", "widths", "ranks", "low_rank", "extra_members", "space", "core_prob", "num_random"),
    "Update rule": ("update", "rho", "eg_lr", "keep", "meprop_units", "nested", "log_alignment"),
    "Data": ("data", "seq_len", "img_size", "aa", "reprob", "crop_pct", "mixup", "cutmix", "workers"),
    "Loop": ("steps", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "momentum", "nesterov", "warmup_steps",
             "clip_grad", "label_smoothing", "seed", "device", "compile", "compile_backend", "channels_last", "amp",
             "accum_steps", "ema", "ema_decay"),
    "Distributed": ("sync_bn", "dist_timeout", *LAUNCH_OPTIONS),
    "Output": ("init", "save_dir", "resume", "overwrite", "ckpt_every", "eval_every", "eval_limit", "stop_after"),
}  # fmt: skip


def _panel(name: str) -> str | None:
    return next((panel for panel, names in PANELS.items() if name in names), None)


for _option in TRAIN_OPTIONS:  # listed panel by panel, those in none first
    _option.annotation.__metadata__[0].rich_help_panel = _panel(_option.name)
TRAIN_OPTIONS.sort(key=lambda o: list(PANELS).index(_panel(o.name)) if _panel(o.name) else -1)


@command("train", epilog="Example: zoo train slim_resnet20 --out runs/resnet20")
@takes(*TRAIN_OPTIONS)
def train_command(
    model: Annotated[str, typer.Argument(help="A catalogue name (`zoo list`), or a family's file or folder.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: model.safetensors, metrics.jsonl, checkpoint.pt.")],
    **options,
) -> None:
    """Train a family: the full model jointly with its members, masked so a core step moves only the core."""
    model = _family_model(model, options)
    _check_before_torch(model, options)
    from training.launch import Launch, launch
    from training.signals import Interrupted
    from training.trainer import TrainConfig, train

    where = Launch(**{name: options.pop(name) for name in LAUNCH_OPTIONS})
    save_dir = options.pop("save_dir")
    config = TrainConfig.from_flags(model, str(out), **_config_flags(options))
    where.check()
    if where.needed:  # not yet inside the launched processes
        config.check()
        raise typer.Exit(launch(sys.argv[1:], where))
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(config, _Progress())
    except Interrupted as stop:  # a second signal, or one outside the loop: no new checkpoint
        if main:
            typer.echo(str(stop), err=True)
        raise typer.Exit(stop.exit_code) from None
    if result.stopped_by is not None:  # SIGTERM or SIGINT: the step finished and was checkpointed
        if main:
            typer.echo(f"stopped at step {result.steps} of {result.total_steps}; continue with --resume", err=True)
        raise typer.Exit(128 + result.stopped_by)
    if main:
        _report_run(model, out, result, save_dir)


def _family_model(model: str, options: dict) -> str:
    """The catalogue name to train. A family's file or folder in its place is the run's start
    (its ``--init``): the name is the one it records."""
    catalogue = zoo_module("catalogue")
    if model in catalogue.MODELS:
        return model
    path = Path(model).expanduser()
    if not path.exists():
        if "/" in model or model.endswith(".safetensors"):
            raise ValueError(f"no such family file or folder: {model}")
        return catalogue.check_name(model)
    if options["init"] is not None:
        raise ValueError(f"{model} is the family to start from, as --init {options['init']} is: give one of them")
    options["init"] = path
    return zoo_module("header").read_header(path)["arch"]


def _check_before_torch(model: str, options: dict) -> None:
    """What a typo gets wrong, checked before torch and timm load (seconds): the model's name,
    the files and data paths named, the members' JSON."""
    zoo_module("catalogue").check_name(model)
    if options["init"] is not None:
        zoo_module("header").read_header(options["init"])
    check_data_path(options["data"], "--data")
    parse_members(options["extra_members"])


def _config_flags(options: dict) -> dict:
    """The training configuration's flags from the parsed options: choices by value, empty
    lists as "not given", members parsed, paths as strings."""
    flags = {k: v.value if isinstance(v, Enum) else v for k, v in options.items()}
    flags.update(widths=flags["widths"] or None, ranks=flags["ranks"] or None)
    flags["extra_members"] = parse_members(flags["extra_members"]) or None
    flags["init"] = str(flags["init"]) if flags["init"] else None
    return flags


def _report_run(model: str, out: Path, result, save_dir: Optional[Path]) -> None:
    """What rank 0 prints at the end of a run (and writes with --save-dir)."""
    if result.already_finished:
        typer.echo(
            f"{out}: the run is already finished ({result.steps} steps in {result.wall_time_s:.0f} s); "
            "nothing was trained or rewritten"
        )
        _print_members(f"{model}: recorded metrics", result.metrics, result.metric, result.member_params)
        return
    if not result.finished:
        typer.echo(f"stopped after step {result.steps} of {result.total_steps}; continue with --resume")
        return
    title = f"{model}: {result.steps} steps in {result.wall_time_s:.0f} s"
    _print_members(title, result.metrics, result.metric, result.member_params)
    if result.ema_path is not None:
        _print_members(f"{model}: EMA weights", result.ema_metrics, result.metric, result.member_params)
    written = [result.model_path, *([result.ema_path] if result.ema_path else []), result.out / "metrics.jsonl"]
    typer.echo(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    if save_dir is not None:
        import zoo

        zoo.save_pretrained(zoo.load(result.model_path), save_dir)
        typer.echo(f"wrote {save_dir} (config.json, model.safetensors)")


@command("eval", epilog="Example: zoo eval runs/resnet20/model.safetensors --width 0.5")
def eval_command(
    weights: str = typer.Argument(..., help="A zoo weights file, or a catalogue name with --pretrained."),
    pretrained: bool = PRETRAINED,
    data: Optional[str] = typer.Option(
        None, "--data", help="Data spec; default: the one recorded in the file, else the family's default."
    ),
    width: Optional[List[float]] = typer.Option(
        None, "--width", help="Widths to evaluate (repeatable); default: the trained members."
    ),
    rank: Optional[List[float]] = typer.Option(
        None, "--rank", help="Ranks to evaluate (repeatable, low-rank families)."
    ),
    member: Optional[List[str]] = MEMBER,
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Evaluation batch; default 256 images, or 8192 bytes of byte windows."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate on the first N validation items only."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA if available."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """Metric per member on the validation split: accuracy (classifiers) or bits per byte (byte models)."""
    path = readable_weights(weights, pretrained, "eval")
    chosen_members = parse_members(member)
    check_data_path(data, "--data")
    import zoo
    from training.distributed import resolve_device
    from training.evaluate import calibration_batches, default_batch_size, evaluate, metric_name
    from training.loader import default_workers
    from training.model_data import data_for
    from zoo.members import calibrate_members, select_members

    torch_device = resolve_device(device.value)
    model = zoo.load(path).to(torch_device)
    members = select_members(model, width, rank, chosen_members)
    bundle = data_for(model, "evaluate", data)
    recalibrated = calibrate_members(model, members, calibration_batches(bundle))
    if recalibrated:
        typer.echo(
            f"batch-norm statistics recalibrated for {len(recalibrated)} untrained member(s) on {bundle.spec} "
            f"(training split)",
            err=True,
        )
    started = time.perf_counter()
    with _EvalProgress(f"evaluating {model.arch} ({len(members)} members)") as progress:
        records = evaluate(
            model,
            bundle.val,
            members,
            batch_size=batch_size or default_batch_size(model),
            limit=limit,
            progress=progress,
            workers=default_workers(bundle),  # image folders: decoded in worker processes
        )
    if json_output:
        typer.echo(json.dumps(records))
        return
    params = {s.key: zoo.count_params(model, s) for s in members}
    count = min(len(bundle.val), limit or len(bundle.val))
    title = f"{model.arch} on {bundle.spec} (validation, {count} items, {time.perf_counter() - started:.1f} s)"
    _print_members(title, records, metric_name(model), params)


def _print_members(title: str, records: list[dict], metric: str, params: dict[str, int]) -> None:
    from rich.console import Console
    from rich.table import Table

    from zoo import Member

    table = Table(title=title, box=None)
    for column in ("member", "params", metric.replace("_", " "), "loss"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for r in records:
        member = Member.from_dict(r["subnet"])
        value = f"{r[metric]:.4f}" if metric == "accuracy" else f"{r[metric]:.3f}"
        table.add_row(str(member), f"{params.get(member.key, 0):,}", value, f"{r['loss']:.4f}")
    Console().print(table)


class _Progress:
    """A live progress bar (loss, samples/s) on a terminal; one line per evaluation otherwise.

    On a narrow terminal the description and the bar give way: the step count, loss, speed and
    times keep their width."""

    def __init__(self, console=None):
        self.console = console

    def start(self, total_steps: int, done: int, description: str, batch_size: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        self.console = self.console or Console()
        self.batch_size, self.last_time, self.rate = batch_size, time.perf_counter(), None
        self.progress = None
        if done:
            self.console.print(f"resumed at step {done} of {total_steps}")
        if self.console.is_terminal:
            give_way = Column(no_wrap=True, overflow="ellipsis", max_width=max(8, self.console.width - 60))
            columns = [
                TextColumn("{task.description}", table_column=give_way),
                BarColumn(None, table_column=Column(ratio=1)),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]}/s"),  # samples per second
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ]
            self.progress = Progress(*columns, console=self.console, transient=False)
            self.task = self.progress.add_task(description, total=total_steps, completed=done, loss="-", rate="-")
            self.progress.start()
        else:
            self.console.print(f"training {description}: {total_steps} steps")

    def step(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        rate = self.batch_size / max(now - self.last_time, 1e-9)
        self.rate = rate if self.rate is None else 0.9 * self.rate + 0.1 * rate
        self.last_time = now
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{self.rate:,.0f}")

    def evaluated(self, step: int, records: list[dict]) -> None:
        from zoo import Member

        parts = []
        for r in records:
            metric = f"acc {r['accuracy']:.4f}" if "accuracy" in r else f"bpb {r['bits_per_byte']:.3f}"
            parts.append(f"{Member.from_dict(r['subnet'])}: {metric}")
        self.console.print(f"step {step}: " + " | ".join(parts), soft_wrap=True, highlight=False)
        self.last_time = time.perf_counter()  # evaluation time is not training speed

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def note(self, text: str) -> None:
        from rich.console import Console

        Console().print(text, highlight=False, soft_wrap=True)


class _EvalProgress:
    """Progress of `zoo eval` on stderr (stdout stays the table or the JSON): a live bar on a
    terminal, else a line at every tenth, so logs of long evaluations show it is moving."""

    def __init__(self, description: str):
        from rich.console import Console

        self.console, self.description = Console(stderr=True), description
        self.bar, self.next_tenth, self.started = None, 1, time.perf_counter()

    def __enter__(self) -> "_EvalProgress":
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ]
            self.bar = Progress(*columns, console=self.console, transient=True)
            self.task = self.bar.add_task(self.description, total=None)
            self.bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
            return
        if done * 10 >= self.next_tenth * total:
            self.console.print(
                f"{self.description}: {100 * done // total}% after {time.perf_counter() - self.started:.0f} s",
                highlight=False,
            )
            self.next_tenth = 10 * done // total + 1

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
