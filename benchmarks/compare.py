"""Does joint training of a family pay off? The paper's claims, measured with zoo's own trainer.

Every row is one call of ``training.trainer.train(TrainConfig.from_flags(...))`` (what ``zoo train``
runs; the equivalent command is logged under each table), repeated over ``--seeds`` seeds;
tables show mean ± std over seeds of the final validation metric of each member, and the
run's wall time (training, batch-norm recalibration and the final evaluation).

1. ``gpt``: a low-rank ``slim_gpt_nano`` on byte-level Python source. The core is rank 0.25
   at width 1.0. Rows: the core alone (``separate``) for N and 2N steps, the full model
   (rank 1.0) alone for N and 2N steps, and ``alternating`` (core-prob 0.5: N core steps and
   N full steps) for 2N steps. The text is the first 1 MiB (``--tiny``: 64 KiB) of zoo's
   ``stdlib`` corpus, written to a text file, because evaluating the full corpus's
   validation split costs more than the training runs themselves on a 2-core CPU.
2. ``resnet``: ``slim_resnet20`` at widths 0.25, 0.5, 0.75, 1.0 on ``digits`` (and on
   ``--data cifar10:PATH`` when given): each width alone vs the family with ``alternating``,
   ``sandwich`` and ``all``, every row the same number of optimizer steps.
3. ``vit``: ``slim_vit_tiny`` at widths 0.5 and 1.0 on ``digits``, the same rows.

    python benchmarks/compare.py                    # all three, 3 seeds -> benchmarks/results/
    python benchmarks/compare.py --only vit --steps 400 --seeds 5   # re-measure one section
    python benchmarks/compare.py --replot           # rewrite compare.md/png from compare.json
    python benchmarks/compare.py --tiny --out /tmp/cmp   # a few steps, one seed (CI)
    python benchmarks/compare.py --only gpt --seed 1 --out /tmp/s1   # one seed per process, then
    python benchmarks/compare.py --merge /tmp/s0 /tmp/s1 /tmp/s2     # their runs in one table

Default steps: N = 1000 for gpt (at N = 150 every row was still near the plateau of a byte
unigram model, 4.35 bits per byte, ``results/gpt-n150``; one seed of the five gpt rows took
82 minutes on a 2-core CPU shared by three such seeds, so run seeds in parallel processes with
``--seed`` and join them with ``--merge``),
60 per row for resnet, 200 per row for vit (short on purpose: on digits every strategy reaches
~99% given a few hundred steps, hiding the differences).

Writes ``compare.md`` (tables, framings, commands), ``compare.json`` (every run's numbers)
and ``compare.png`` (metric per member for each strategy) into ``--out``, atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import load_data  # noqa: E402
from training.trainer import TrainConfig, train  # noqa: E402
from zoo import Member  # noqa: E402
from zoo.fileio import atomic_path  # noqa: E402

SECTIONS = ("gpt", "resnet", "vit")
# Default steps per section: N for gpt (rows run N or 2N), every row for the image families.
DEFAULT_STEPS = {"gpt": 1000, "resnet": 60, "vit": 200}
TINY_STEPS = {"gpt": 4, "resnet": 4, "vit": 4}
GPT_CORPUS_BYTES, TINY_CORPUS_BYTES = 2**20, 2**16
CORE_RANK = 0.25
# Hyper-parameters shared by every row of a section (what a row varies is its strategy,
# members and steps). Image batches are small so that the rows differ on easy digits.
GPT_ARGS = dict(
    model="slim_gpt_nano", low_rank=True, seq_len=128, batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=0.1
)
RESNET_ARGS = dict(model="slim_resnet20", batch_size=32, optimizer="sgd", lr=0.05, weight_decay=5e-4)
VIT_ARGS = dict(model="slim_vit_tiny", batch_size=32, optimizer="adamw", lr=1e-3, weight_decay=0.05)


@dataclass
class Row:
    """One configuration of a table: ``members`` are those whose metric the row reports."""

    label: str
    config: dict
    members: list[Member]
    runs: list[dict] = field(default_factory=list)  # per seed: {"metrics": {key: value}, "wall_s": ..}


@dataclass
class Table:
    name: str  # section key, e.g. "gpt" or "resnet-cifar10"
    title: str
    metric: str  # "bits_per_byte" or "accuracy"
    members: list[Member]  # the columns
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def gpt_table(steps: int, data: str) -> Table:
    core, full = Member(1.0, CORE_RANK), Member(1.0, 1.0)
    base = dict(GPT_ARGS, data=data)
    rows = [
        Row(
            f"separate core (rank {CORE_RANK:g}), N={steps}",
            dict(base, strategy="separate", ranks=[CORE_RANK], steps=steps),
            [core],
        ),
        Row(
            f"separate core (rank {CORE_RANK:g}), 2N={2 * steps}",
            dict(base, strategy="separate", ranks=[CORE_RANK], steps=2 * steps),
            [core],
        ),
        Row(f"separate full (rank 1), N={steps}", dict(base, strategy="separate", ranks=[1.0], steps=steps), [full]),
        Row(
            f"separate full (rank 1), 2N={2 * steps}",
            dict(base, strategy="separate", ranks=[1.0], steps=2 * steps),
            [full],
        ),
        Row(
            f"alternating core+full, 2N={2 * steps} (N core + N full steps)",
            dict(base, strategy="alternating", ranks=[CORE_RANK], core_prob=0.5, steps=2 * steps),
            [core, full],
        ),
    ]
    title = f"Low-rank slim_gpt_nano on {data_label(data)}: validation bits per byte (lower is better)"
    return Table("gpt", title, "bits_per_byte", [core, full], rows)


def image_table(name: str, args: dict, widths: list[float], steps: int, data: str) -> Table:
    members = [Member(w) for w in widths]
    base = dict(args, data=data, steps=steps)
    rows = [Row(f"separate, width {w:g}", dict(base, strategy="separate", widths=[w]), [Member(w)]) for w in widths]
    rows += [Row(s, dict(base, strategy=s, widths=widths), members) for s in ("alternating", "sandwich", "all")]
    title = f"{args['model']} on {data_label(data)}, {steps} steps per row: validation accuracy per width"
    return Table(name, title, "accuracy", members, rows)


def data_label(spec: str) -> str:
    return Path(spec.partition(":")[2]).name if spec.startswith("text:") else spec.split(":")[0]


def write_corpus(folder: Path, size: int) -> str:
    """The first ``size`` bytes of the stdlib corpus's training split as a text file."""
    corpus = load_data("stdlib", seq_len=128).train.data[:size]
    path = folder / f"stdlib-{size // 1024}KiB.txt"
    with atomic_path(path) as tmp:
        tmp.write_bytes(corpus.numpy().tobytes())
    return f"text:{path}"


def command_for(config: dict) -> str:
    """The ``zoo train`` command line equivalent to a row's config."""
    parts = ["zoo train", config["model"]]
    for key, value in config.items():
        if key in ("model", "out") or value is None:
            continue
        flag = "--" + {"widths": "width", "ranks": "rank"}.get(key, key).replace("_", "-")
        if key == "data" and value.startswith("text:"):
            value = f"text:{data_label(value)}"  # the corpus file compare.py writes (see the note above)
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, list):
            parts += [f"{flag} {v:g}" for v in value]
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts) + " --out RUN"


def run_table(table: Table, seeds: list[int], workdir: Path) -> None:
    for row in table.rows:
        for seed in seeds:
            out = Path(tempfile.mkdtemp(dir=workdir))
            result = train(TrainConfig.from_flags(out=str(out), seed=seed, **row.config))
            values = {Member.from_dict(r["subnet"]).key: r[table.metric] for r in result.metrics}
            missing = [s for s in row.members if s.key not in values]
            if missing:
                raise RuntimeError(f"{row.label}: no metric for {missing}")
            row.runs.append(
                {"seed": seed, "metrics": {s.key: values[s.key] for s in row.members}, "wall_s": result.wall_time_s}
            )
            print(f"{table.name} | {row.label} | seed {seed}: {row.runs[-1]}", flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def member_values(row: Row, member: Member) -> list[float]:
    return [run["metrics"][member.key] for run in row.runs if member.key in run["metrics"]]


def fmt(values: list[float], metric: str) -> str:
    """Mean ± std over seeds; just the value when there is one seed."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    scale, digits = {"accuracy": (100, 1), "seconds": (1, 1)}.get(metric, (1, 3))
    text = f"{scale * mean:.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {scale * std:.{digits}f}"


def member_label(member: Member) -> str:
    return f"width {member.width:g}" if member.rank is None else f"rank {member.rank:g}"


def markdown(table: Table) -> str:
    unit = " (%)" if table.metric == "accuracy" else ""
    header = ["row", *[member_label(s) + unit for s in table.members], "wall time (s)"]
    lines = [f"## {table.title}", "", "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in table.rows:
        cells = [fmt(member_values(row, s), table.metric) for s in table.members]
        wall = fmt([run["wall_s"] for run in row.runs], "seconds")
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {wall} |")
    lines += ["", *table.notes, "", "Commands (one per row; each run once per seed with `--seed S`):", "", "```"]
    lines += [command_for(row.config) for row in table.rows]
    return "\n".join(lines + ["```", ""])


def gpt_framings(table: Table) -> list[str]:
    """The three readings of the gpt table the paper's claim can be held to."""
    sep_core_n, sep_core_2n, sep_full_n, sep_full_2n, joint = table.rows
    core, full = table.members

    def mean_of(row: Row, s: Member) -> float:
        return mean_std(member_values(row, s))[0]

    def wall(row: Row) -> float:
        return mean_std([run["wall_s"] for run in row.runs])[0]

    def compare(base: Row, member: Member) -> str:
        """The joint run's mean against ``base``'s, and in how many seeds (paired) it is lower."""
        joint_value, base_value = mean_of(joint, member), mean_of(base, member)
        verdict = "better" if joint_value < base_value else "worse"
        paired = {run["seed"]: run["metrics"][member.key] for run in base.runs}
        seeds = [run for run in joint.runs if run["seed"] in paired]
        wins = sum(run["metrics"][member.key] < paired[run["seed"]] for run in seeds)
        return (
            f"{joint_value:.3f} vs {base_value:.3f} bpb ({verdict} by {abs(joint_value - base_value):.3f}; "
            f"lower in {wins} of {len(seeds)} seeds)"
        )

    core_vs_n, full_vs_n = compare(sep_core_n, core), compare(sep_full_n, full)
    data = sep_core_n.config["data"]
    return [
        f"`{data_label(data)}` is the first {data_label(data).split('-')[-1].removesuffix('.txt')} "
        'of the training split of zoo\'s `stdlib` corpus (`load_data("stdlib").train`), written to a file by this '
        "script; its last 10% is the validation split. Every row uses the same hyper-parameters (the commands below); "
        "rows differ in strategy, trained rank and steps. Learning-rate schedules run over each row's own steps.",
        "",
        "Three framings (means over seeds, and the seeds where the joint run is lower, paired by seed; "
        "lower bits per byte is better):",
        "",
        f"- **Equal updates per member** (alternating 2N vs separate N: each member got N updates): core "
        f"{core_vs_n}; full {full_vs_n}.",
        f"- **Equal total steps** (alternating 2N vs separate 2N): core {compare(sep_core_2n, core)}; "
        f"full {compare(sep_full_2n, full)}.",
        f"- **Equal budget for the whole family** (one joint run of 2N steps, {wall(joint):.0f} s, vs core N + full N "
        f"separately, {wall(sep_core_n) + wall(sep_full_n):.0f} s; the same 2N steps in all): the joint run gives both "
        f"members in one set of weights; core {core_vs_n}, full {full_vs_n}.",
    ]


def image_notes(table: Table) -> list[str]:
    separate = [row for row in table.rows if row.config["strategy"] == "separate"]
    total = sum(mean_std([run["wall_s"] for run in row.runs])[0] for row in separate)
    notes = [
        f"Every row takes the same number of optimizer steps; forward/backward passes per step: separate and "
        f"alternating 1, all {len(table.members)}, sandwich {min(len(table.members), 2 + 2)} "
        "(the largest on the labels, then the smallest and up to 2 random others on its soft outputs: "
        "here every width, the smaller ones distilled).",
        "Each seed also draws its own train/validation split of digits (shared by every row of that seed).",
        f"Training the {len(separate)} widths separately takes {total:.0f} s in all (sum of the separate rows).",
    ]
    for row in table.rows:
        if row.config["strategy"] == "separate":
            continue
        better = [s for s in table.members if _mean(row, s) > _mean(_separate_row(table, s), s)]
        notes.append(
            f"- {row.label}: one run of {mean_std([r['wall_s'] for r in row.runs])[0]:.0f} s; "
            "beats the separate model at "
            f"{', '.join(f'{s.width:g}' for s in better) or 'no width'} (of {len(table.members)})."
        )
    return notes


def _mean(row: Row, member: Member) -> float:
    return mean_std(member_values(row, member))[0]


def _separate_row(table: Table, member: Member) -> Row:
    return next(row for row in table.rows if row.config["strategy"] == "separate" and row.members == [member])


def plot(tables: list[Table], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.2), squeeze=False)
    for ax, table in zip(axes[0], tables):
        scale = 100.0 if table.metric == "accuracy" else 1.0
        positions = {s.key: i for i, s in enumerate(table.members)}
        separate_x, separate_y, separate_err = [], [], []
        for row in table.rows:
            xs = [positions[s.key] for s in row.members]
            stats = [mean_std(member_values(row, s)) for s in row.members]
            ys, errs = [m * scale for m, _ in stats], [e * scale for _, e in stats]
            if row.config["strategy"] == "separate" and table.name != "gpt":
                separate_x += xs
                separate_y += ys
                separate_err += errs
                continue
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=row.label)
        if separate_x:
            ax.errorbar(
                separate_x,
                separate_y,
                yerr=separate_err,
                marker="s",
                capsize=3,
                color="black",
                label="separate (one run per width)",
            )
        ax.set_xticks(range(len(table.members)), [member_label(s) for s in table.members])
        ax.set_ylabel("validation accuracy (%)" if table.metric == "accuracy" else "validation bits per byte")
        ax.set_title(table.name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table_record(table: Table) -> dict:
    rows = [
        {"label": r.label, "config": r.config, "members": [s.to_dict() for s in r.members], "runs": r.runs}
        for r in table.rows
    ]
    members = [s.to_dict() for s in table.members]
    return {"name": table.name, "title": table.title, "metric": table.metric, "members": members, "rows": rows}


def table_from_record(record: dict) -> Table:
    rows = [
        Row(r["label"], r["config"], [Member.from_dict(s) for s in r["members"]], r["runs"]) for r in record["rows"]
    ]
    members = [Member.from_dict(s) for s in record["members"]]
    return Table(record["name"], record["title"], record["metric"], members, rows)


def merged_with_previous(tables: list[Table], out: Path) -> tuple[list[Table], list[dict]]:
    """Tables just measured plus the other sections' tables from an earlier ``compare.json`` in
    ``out`` (with the commands that measured them): ``--only`` re-measures one section and
    keeps the rest."""
    previous_path = out / "compare.json"
    if not previous_path.is_file():
        return tables, []
    previous = json.loads(previous_path.read_text())
    fresh = {t.name for t in tables}
    kept = [table_from_record(r) for r in previous["tables"] if r["name"] not in fresh]
    kept_names = {t.name for t in kept}
    commands = []
    for c in previous["commands"]:
        sections = [name for name in c["sections"] if name in kept_names]
        if sections:
            commands.append({**c, "sections": sections})
    order = {name: i for i, name in enumerate(SECTIONS)}
    merged = sorted(kept + tables, key=lambda t: (order.get(t.name.split("-")[0], len(order)), t.name))
    return merged, commands


def write_outputs(tables: list[Table], new_commands: list[dict], out: Path) -> None:
    tables, commands = merged_with_previous(tables, out)
    rewrite(tables, commands + new_commands, out)


def _same_settings(config: dict) -> dict:
    """A row's config with the corpus's scratch folder left out (each process writes its own)."""
    return {**config, "data": data_label(config["data"])}


def merge_parts(parts: list[Path]) -> tuple[list[Table], list[dict]]:
    """The tables of several ``compare.json`` files as one: every row's runs are the union of
    the parts' runs (seeds measured by separate processes). The parts must have measured each
    shared table with the same rows and settings, and no seed twice."""
    merged: dict[str, Table] = {}
    commands: list[dict] = []
    for part in parts:
        record = json.loads((part / "compare.json").read_text())
        commands += record["commands"]
        for table in map(table_from_record, record["tables"]):
            if table.name not in merged:
                merged[table.name] = table
                continue
            base = merged[table.name]
            if [(r.label, _same_settings(r.config)) for r in base.rows] != [
                (r.label, _same_settings(r.config)) for r in table.rows
            ]:
                raise ValueError(f"{part}: the {table.name} table was measured with other rows or settings")
            for into, row in zip(base.rows, table.rows):
                repeated = {r["seed"] for r in into.runs} & {r["seed"] for r in row.runs}
                if repeated:
                    raise ValueError(f"{part}: seed {min(repeated)} of the {table.name} table is measured twice")
                into.runs = sorted(into.runs + row.runs, key=lambda r: r["seed"])
    return list(merged.values()), commands


def rewrite(tables: list[Table], commands: list[dict], out: Path) -> None:
    """compare.md, compare.json and compare.png from the measured runs."""
    for table in tables:
        table.notes = gpt_framings(table) if table.name == "gpt" else image_notes(table)
    measured_by = "; ".join(
        f"`{c['command']}` ({', '.join(c['sections'])}; seeds {', '.join(map(str, c['seeds']))}; "
        f"{c['threads']} torch thread(s))"
        for c in commands
    )
    head = [
        "# Joint training vs separate training",
        "",
        f"Measured with {measured_by}: mean ± std over seeds. "
        f"torch {', '.join(sorted({c.get('torch', '(not recorded)') for c in commands}))}, {platform.machine()} CPU "
        "shared with other jobs, so wall times are rough. Wall time covers training, batch-norm recalibration and "
        "the final evaluation of every trained member on the whole validation split.",
        "",
    ]
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text("\n".join(head + [markdown(table) for table in tables]))
    with atomic_path(out / "compare.json") as tmp:
        tmp.write_text(json.dumps({"commands": commands, "tables": [table_record(t) for t in tables]}, indent=1))
    plot(tables, out / "compare.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (0, 1, ...)")
    parser.add_argument(
        "--seed", type=int, action="append", help="run exactly this seed (repeatable; overrides --seeds)"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="only combine the runs in these folders' compare.json into --out",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps: N for gpt, every row for resnet/vit (default per section)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--data", default=None, help="also run the resnet table on this image data, e.g. cifar10:PATH")
    parser.add_argument(
        "--replot", action="store_true", help="only rewrite compare.md and compare.png from compare.json in --out"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps, seed 0 unless --seed: an end-to-end check, not a measurement"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or (args.steps is not None and args.steps < 2):
        parser.error("--seeds must be at least 1 and --steps at least 2")
    if args.seed and min(args.seed) < 0:
        parser.error("--seed must be at least 0")
    missing = [str(d) for d in args.merge or [] if not (d / "compare.json").is_file()]
    if missing:
        parser.error(f"--merge: no compare.json in {', '.join(missing)}")
    if args.data:
        try:
            if load_data(args.data).kind != "image":
                parser.error(f"--data {args.data} holds text; the resnet table needs images")
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"--data: {err}")
    return args


def main(argv: list[str] | None = None) -> list[Table]:
    args = parse_args(argv)
    if args.replot:
        record = json.loads((args.out / "compare.json").read_text())
        tables = [table_from_record(r) for r in record["tables"]]
        rewrite(tables, record["commands"], args.out)
        return tables
    if args.merge:
        try:
            tables, commands = merge_parts(args.merge)
        except ValueError as err:
            raise SystemExit(f"--merge: {err}") from None
    else:
        tables, commands = measure(args, argv)
    write_outputs(tables, commands, args.out)
    print(f"wrote {args.out / 'compare.md'}, compare.json and compare.png")
    return tables


def measure(args: argparse.Namespace, argv: list[str] | None) -> tuple[list[Table], list[dict]]:
    """Train every row of the chosen sections; the tables and the command that measured them."""
    seeds = sorted(set(args.seed)) if args.seed else [0] if args.tiny else list(range(args.seeds))
    sections = args.only or list(SECTIONS)
    steps = {s: args.steps or (TINY_STEPS if args.tiny else DEFAULT_STEPS)[s] for s in SECTIONS}
    tables: list[Table] = []
    with tempfile.TemporaryDirectory(prefix="zoo-compare-") as scratch:
        workdir = Path(scratch)
        if "gpt" in sections:
            corpus = write_corpus(workdir, TINY_CORPUS_BYTES if args.tiny else GPT_CORPUS_BYTES)
            tables.append(gpt_table(steps["gpt"], corpus))
        if "resnet" in sections:
            tables.append(image_table("resnet", RESNET_ARGS, [0.25, 0.5, 0.75, 1.0], steps["resnet"], "digits"))
            if args.data:
                tables.append(
                    image_table(
                        f"resnet-{args.data.split(':')[0]}",
                        RESNET_ARGS,
                        [0.25, 0.5, 0.75, 1.0],
                        steps["resnet"],
                        args.data,
                    )
                )
        if "vit" in sections:
            tables.append(image_table("vit", VIT_ARGS, [0.5, 1.0], steps["vit"], "digits"))
        for table in tables:
            for row in table.rows:
                row.config["eval_every"] = row.config["steps"]  # no periodic evaluation: time only training
                if args.tiny:  # keep the CI check short: small batches
                    row.config["batch_size"] = 8
        for table in tables:
            run_table(table, seeds, workdir)
    command = ("python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    return tables, [
        {
            "command": command,
            "sections": [t.name for t in tables],
            "seeds": seeds,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    ]


if __name__ == "__main__":
    main()
