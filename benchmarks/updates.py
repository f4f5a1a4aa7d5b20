"""Update policies vs plain training: the validation metric against steps and wall time, and
the measured alignment ``cos(m ⊙ g(x + δ), g(x))`` next to how fast each run converges.

Every run is ``training.trainer.train(TrainConfig(...))`` (what ``zoo train`` runs) with
``--strategy separate`` (one network, width 1: the policies alone, no member schedule),
``--log-alignment``, and a periodic evaluation on a fixed validation subset.

    python benchmarks/updates.py --only resnet --steps 300 --seeds 1     # the short run recorded in the README
    python benchmarks/updates.py                                         # both models, 3 seeds (hours on 2 CPU cores)

Writes ``updates.md`` (table), ``updates.json`` (every run's curves) and ``updates.png``
(metric against steps and against wall time, one row per model) into ``--out``.
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
}
MODELS = {
    "resnet": dict(model="slim_resnet20", data="digits", batch_size=64, eval_limit=512),
    "gpt": dict(model="slim_gpt_nano", data="stdlib", batch_size=16, seq_len=128, eval_limit=64),
}


def run(section: str, policy: str, steps: int, seed: int, out: Path) -> dict:
    options = POLICIES[policy]
    name = policy.split()[0]
    evals = 10
    config = TrainConfig(out=str(out / f"{section}-{policy.replace(' --', '-')}-s{seed}"), strategy="separate", widths=[1.0], steps=steps,
                         eval_every=max(1, steps // evals), log_alignment=max(1, steps // evals), seed=seed, update=name,
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
    }  # fmt: skip


def steps_to(curve: list, target: float, higher_better: bool) -> int | None:
    """The first evaluated step whose metric reaches ``target`` (None: never)."""
    return next((s for s, v in curve if (v >= target if higher_better else v <= target)), None)


def report(runs: list[dict], out: Path) -> None:
    lines = ["| model | policy | final metric | steps to 95% of plain's final | mean cos(m⊙g(x+δ), g(x)) | mean norm ratio | wall s (alignment s) |", "|---|---|---|---|---|---|---|"]
    for section in dict.fromkeys(r["section"] for r in runs):
        rows = [r for r in runs if r["section"] == section]
        higher = rows[0]["metric"] == "accuracy"
        plain = statistics.mean(r["final"] for r in rows if r["policy"] == "full")
        target = 0.95 * plain if higher else plain / 0.95
        for policy in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["policy"] == policy]
            reach = [steps_to(r["curve"], target, higher) for r in mine]
            lines.append(
                f"| {section} | {policy} | {statistics.mean(r['final'] for r in mine):.4f} ({mine[0]['metric']}, {len(mine)} seed(s)) "
                f"| {', '.join('never' if s is None else str(s) for s in reach)} | {statistics.mean(r['alignment_cosine'] for r in mine):.3f} "
                f"| {statistics.mean(r['alignment_norm_ratio'] for r in mine):.3f} | {statistics.mean(r['wall_time_s'] for r in mine):.0f} ({statistics.mean(r['alignment_s'] for r in mine):.0f}) |"
            )
    with atomic_path(out / "updates.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "updates.json") as tmp:
        tmp.write_text(json.dumps(runs, indent=1))
    plot(runs, out)
    print("\n".join(lines))


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = list(dict.fromkeys(r["section"] for r in runs))
    fig, axes = plt.subplots(len(sections), 2, figsize=(11, 4 * len(sections)), squeeze=False)
    for row, section in zip(axes, sections):
        for r in (r for r in runs if r["section"] == section):
            steps, values = zip(*r["curve"])
            label = f"{r['policy']} (s{r['seed']}, cos {r['alignment_cosine']:.2f})"
            row[0].plot(steps, values, marker=".", label=label)
            row[1].plot([s * r["wall_time_s"] / r["steps"] for s in steps], values, marker=".", label=label)
        for ax, x in zip(row, ("step", "wall time (s, incl. evaluation)")):
            ax.set_xlabel(x)
            ax.set_ylabel(f"{section}: {r['metric']}")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "updates.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(MODELS), action="append")
    parser.add_argument("--steps", type=int, default=None, help="default: 600 (resnet), 1000 (gpt)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "updates")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for section in args.only or list(MODELS):
            steps = args.steps or {"resnet": 600, "gpt": 1000}[section]
            for seed in range(args.seeds):
                for policy in args.policies:
                    runs.append(run(section, policy, steps, seed, Path(work)))
                    print(f"{section} {policy} seed {seed}: {runs[-1]['final']:.4f} in {runs[-1]['wall_time_s']:.0f} s", flush=True)
    report(runs, args.out)


if __name__ == "__main__":
    main()
