"""Update policies vs plain training: the validation metric against steps and wall time, and
the measured alignment ``cos(m ⊙ g(x + δ), g(x))`` next to how fast each run converges.

Every run is ``training.trainer.train(TrainConfig.from_flags(...))`` (what ``zoo train`` runs) with
``--strategy separate`` (one network, width 1: the policies alone, no member schedule),
``--log-alignment``, and a periodic evaluation on a fixed validation subset.

    python benchmarks/updates.py --only resnet --seeds 1     # one model, one seed
    python benchmarks/updates.py                             # both models, 3 seeds (hours on 2 CPU cores)

Each finished run is kept in ``--out/runs/<run>.json`` and is not run again, so an interrupted
benchmark resumes where it stopped and seeds can run in separate processes (``--seed-list``);
``--report`` only merges the kept runs. Writes ``updates.md`` (table), ``updates.json`` (every
run's curves) and ``updates.png`` (metric against steps and against wall time, one row per
model) into ``--out``.

``rank-dropout`` trains the low-rank family (``--low-rank``) at rank 1; its row is compared with
``full (low-rank)``, plain training of that same family, and both are also evaluated at ranks
0.25 and 0.5 of the trained weights (batch norm recalibrated): nested rank dropout is meant to
leave every rank prefix usable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.trainer import TrainConfig, train  # noqa: E402
from zoo.fileio import atomic_path  # noqa: E402

POLICIES = {
    "full": {},
    "sam": {"rho": 0.05},
    "extragradient": {"eg_lr": 0.05},
    "meprop": {"keep": 0.1},
    "unit-dropout": {"keep": 0.75},
    "unit-dropout --nested": {"keep": 0.5, "nested": True},
    "full (low-rank)": {},
    "rank-dropout": {"keep": 0.25},
}
LOW_RANK = ("full (low-rank)", "rank-dropout")
PREFIX_RANKS = (0.25, 0.5)
MODELS = {
    "resnet": dict(model="slim_resnet20", data="digits", batch_size=64, eval_limit=512),
    "gpt": dict(model="slim_gpt_nano", data="stdlib", batch_size=16, seq_len=128, eval_limit=64),
}


def run_name(section: str, policy: str, seed: int) -> str:
    return f"{section}-{policy.replace(' --', '-').replace(' (', '-').rstrip(')')}-s{seed}"


def run(section: str, policy: str, steps: int, seed: int, out: Path) -> dict:
    options = POLICIES[policy]
    name = policy.split()[0]
    evals = 10
    low_rank = policy in LOW_RANK
    config = TrainConfig.from_flags(out=str(out / run_name(section, policy, seed)), strategy="separate", widths=[1.0],
                                    steps=steps, eval_every=max(1, steps // evals),
                                    log_alignment=max(1, steps // evals), seed=seed, update=name, low_rank=low_rank,
                                    ranks=[1.0] if low_rank else None,
                                    **options, **MODELS[section])  # fmt: skip
    result = train(config)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    metric = result.metric
    curve = [(r["step"], r[metric]) for r in records if metric in r]
    alignment = [r for r in records if "alignment_cosine" in r]
    return {
        "section": section, "policy": policy, "seed": seed, "steps": steps, "metric": metric,
        "final": curve[-1][1], "curve": curve, "wall_time_s": result.wall_time_s,
        "alignment_cosine": statistics.mean(r["alignment_cosine"] for r in alignment),
        "alignment_norm_ratio": statistics.mean(r["alignment_norm_ratio"] for r in alignment),
        "alignment_s": sum(r["alignment_s"] for r in alignment),
        "prefix_ranks": prefix_ranks(result.model_path, MODELS[section]["eval_limit"]) if low_rank else {},
    }  # fmt: skip


def prefix_ranks(path: Path, limit: int) -> dict[str, float]:
    """The trained low-rank model's metric at smaller rank prefixes (never trained as members)."""
    import zoo
    from training.evaluate import MemberScorer
    from training.model_data import data_for

    model = zoo.load(path)
    scorer = MemberScorer(model, data_for(model, "evaluate"), limit=limit)
    return {str(r): scorer(model.resolve_member(rank=r)) for r in PREFIX_RANKS}


def steps_to(curve: list, target: float, higher_better: bool) -> int | None:
    """The first evaluated step whose metric reaches ``target`` (None: never)."""
    return next((s for s, v in curve if (v >= target if higher_better else v <= target)), None)


def report(runs: list[dict], out: Path) -> None:
    lines = [
        "| model | policy | final metric | steps to 95% of plain's final | mean cos(m⊙g(x+δ), g(x)) "
        "| mean norm ratio | wall s (alignment s) | at rank 0.25 / 0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for section in dict.fromkeys(r["section"] for r in runs):
        rows = [r for r in runs if r["section"] == section]
        higher = rows[0]["metric"] == "accuracy"
        for policy in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["policy"] == policy]
            baseline = "full (low-rank)" if policy in LOW_RANK else "full"
            plain = [r["final"] for r in rows if r["policy"] == baseline]
            target = (0.95 * statistics.mean(plain) if higher else statistics.mean(plain) / 0.95) if plain else None
            reach = [steps_to(r["curve"], target, higher) if target is not None else "-" for r in mine]
            prefixes = (
                " / ".join(f"{statistics.mean(r['prefix_ranks'][str(k)] for r in mine):.4f}" for k in PREFIX_RANKS)
                if policy in LOW_RANK
                else ""
            )
            lines.append(
                f"| {section} | {policy} | {statistics.mean(r['final'] for r in mine):.4f} "
                f"({mine[0]['metric']}, {len(mine)} seed(s)) "
                f"| {', '.join('never' if s is None else str(s) for s in reach)} "
                f"| {statistics.mean(r['alignment_cosine'] for r in mine):.3f} "
                f"| {statistics.mean(r['alignment_norm_ratio'] for r in mine):.3f} "
                f"| {statistics.mean(r['wall_time_s'] for r in mine):.0f} "
                f"({statistics.mean(r['alignment_s'] for r in mine):.0f}) | {prefixes} |"
            )
    with atomic_path(out / "updates.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "updates.json") as tmp:
        tmp.write_text(json.dumps(runs, indent=1))
    plot(runs, out)
    print("\n".join(lines))


def plot(runs: list[dict], out: Path) -> None:
    """One line per policy: the mean over seeds (the runs share their evaluation steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = list(dict.fromkeys(r["section"] for r in runs))
    fig, axes = plt.subplots(len(sections), 2, figsize=(12, 4.5 * len(sections)), squeeze=False)
    for row, section in zip(axes, sections):
        rows = [r for r in runs if r["section"] == section]
        for policy in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["policy"] == policy]
            steps = [s for s, _ in mine[0]["curve"]]
            values = [statistics.mean(r["curve"][i][1] for r in mine) for i in range(len(steps))]
            seconds_per_step = statistics.mean(r["wall_time_s"] / r["steps"] for r in mine)
            label = f"{policy} (cos {statistics.mean(r['alignment_cosine'] for r in mine):.2f}, {len(mine)} seeds)"
            row[0].plot(steps, values, marker=".", label=label)
            row[1].plot([s * seconds_per_step for s in steps], values, marker=".", label=label)
        for ax, x in zip(row, ("step", "wall time (s, incl. evaluation)")):
            ax.set_xlabel(x)
            ax.set_ylabel(f"{section}: {rows[0]['metric']}")
            if rows[0]["metric"] == "bits_per_byte":
                ax.set_ylim(top=5.0)
        row[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    with atomic_path(out / "updates.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(MODELS), action="append")
    parser.add_argument("--steps", type=int, default=None, help="default: 600 (resnet), 1000 (gpt)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", type=int, nargs="*", help="run only these seeds (default: 0 .. --seeds - 1)")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--report", action="store_true", help="only merge the kept runs into the table and plot")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "updates")
    args = parser.parse_args()
    kept = args.out / "runs"
    kept.mkdir(parents=True, exist_ok=True)
    sections = args.only or list(MODELS)
    if not args.report:
        with tempfile.TemporaryDirectory() as work:
            for section in sections:
                steps = args.steps or {"resnet": 600, "gpt": 1000}[section]
                for seed in args.seed_list if args.seed_list is not None else range(args.seeds):
                    for policy in args.policies:
                        path = kept / f"{run_name(section, policy, seed)}.json"
                        if path.exists() and json.loads(path.read_text())["steps"] == steps:
                            continue
                        result = run(section, policy, steps, seed, Path(work))
                        with atomic_path(path) as tmp:
                            tmp.write_text(json.dumps(result))
                        print(
                            f"{section} {policy} seed {seed}: {result['final']:.4f} in {result['wall_time_s']:.0f} s",
                            flush=True,
                        )
    runs = [json.loads(p.read_text()) for p in sorted(kept.glob("*.json"))]
    order = {(s, p): i for i, (s, p) in enumerate((s, p) for s in MODELS for p in POLICIES)}
    runs = sorted(
        (r for r in runs if r["section"] in sections and r["policy"] in args.policies),
        key=lambda r: (order[r["section"], r["policy"]], r["seed"]),
    )
    report(runs, args.out)


if __name__ == "__main__":
    main()
