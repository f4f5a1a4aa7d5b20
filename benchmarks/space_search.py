"""Does training the whole space pay? Search fronts of families trained with uniform and with
layerwise sampling, against their uniform members, at equal cost.

For each pair of runs (the same family trained with ``--space uniform`` and ``--space
layerwise``), this runs ``zoo search`` under each budget on both and writes one table:

* the best member the search finds within the budget, on each family;
* the best uniform (trained) member within the same budget, on each family;
* what layerwise training costs the uniform members (their final metrics in both runs);
* for latency budgets, how far the search's latency of the chosen member is from the
  latency of its exported file measured on its own;
* the same random members of the layerwise space (``--random-members N``, seeded) evaluated on
  both families, paired: what training the whole space buys members off the diagonal.

    python benchmarks/space_search.py --pair resnet20 runs/space/resnet20-uniform runs/space/resnet20-layerwise \\
        --budget flops=0.3M --budget flops=1M --budget latency=0.3 --out benchmarks/results/space

Every search is a real ``zoo search`` process; results land in ``OUT/<pair>-<space>-<budget>/``
and the table in ``OUT/space.md`` (merged with the pairs measured before).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_search(weights: Path, budget: str, out: Path, args) -> dict:
    if not (out / "pareto.json").exists():
        command = [
            "zoo",
            "search",
            str(weights),
            "--budget",
            budget,
            "--out",
            str(out),
            "--population",
            str(args.population),
            "--generations",
            str(args.generations),
            "--seed",
            str(args.seed),
            "--threads",
            "1",
        ]
        if args.limit:
            command += ["--limit", str(args.limit)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
        (out / "command.txt").write_text(
            " ".join(command) + f"\n# {time.perf_counter() - started:.0f} s\n{done.stdout}"
        )
    return json.loads((out / "pareto.json").read_text())


def metric_of(weights: Path) -> str:
    from zoo.weights import read_header

    metrics = read_header(weights)["metadata"]["metrics"]
    return "accuracy" if any("accuracy" in m for m in metrics) else "bits_per_byte"


def uniform_metrics(weights: Path) -> dict[str, float]:
    from zoo.weights import read_header

    name = metric_of(weights)
    return {json.dumps(m["subnet"], sort_keys=True): m[name] for m in read_header(weights)["metadata"]["metrics"]}


def random_members(weights: Path, count: int, seed: int, limit: int | None) -> list[dict]:
    """``count`` members drawn from the layerwise space with ``seed`` (the same members for
    every family of the same architecture and grid), each scored as ``zoo search`` scores."""
    import torch

    import zoo
    from training.evaluate import MemberScorer
    from training.model_data import data_for

    model = zoo.load(weights).eval()
    scorer = MemberScorer(model, data_for(model, "evaluate"), limit)
    generator = torch.Generator().manual_seed(seed)
    members = [model.resolve_member(model.sample_member(generator)) for _ in range(count)]
    return [{"member": m.to_dict(), "metric": scorer(m), "params": zoo.count_params(model, m)} for m in members]


def fmt_member(member: dict) -> str:
    return ", ".join(
        f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(f'{x:g}' for x in v)}]" for k, v in member.items()
    )


def fmt_cost(kind: str, value: float) -> str:
    return {"latency": f"{value:.3f} ms", "flops": f"{value / 1e6:.3g} MFLOPs"}.get(kind, f"{value:,.0f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pair", nargs=3, action="append", metavar=("NAME", "UNIFORM_RUN", "LAYERWISE_RUN"), required=True
    )
    parser.add_argument("--budget", action="append", required=True)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--random-members", type=int, default=0, help="Also score this many random members on both families."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "space")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    for name, uniform_run, layerwise_run in args.pair:
        entry = results.setdefault(name, {"budgets": {}})
        runs = {
            "uniform": Path(uniform_run) / "model.safetensors",
            "layerwise": Path(layerwise_run) / "model.safetensors",
        }
        entry["metric"] = metric_of(runs["uniform"])
        entry["uniform_members"] = {space: uniform_metrics(path) for space, path in runs.items()}
        if args.random_members and len(entry.get("random", {}).get("uniform", [])) != args.random_members:
            entry["random"] = {
                space: random_members(path, args.random_members, args.seed, args.limit) for space, path in runs.items()
            }
        for budget in args.budget:
            row = entry["budgets"].setdefault(budget, {})
            for space, weights in runs.items():
                report = run_search(weights, budget, args.out / f"{name}-{space}-{budget.replace('=', '-')}", args)
                kind, limit = report["budget"]["kind"], report["budget"]["limit"]
                within = [g for g in report["grid"] if g[kind] <= limit]
                sign = 1 if report["higher_is_better"] else -1
                best_grid = max(within, key=lambda g: sign * g["metric"]) if within else None
                row[space] = {
                    "best": report["best"],
                    "best_uniform": best_grid,
                    "kind": kind,
                    "metric": report["metric"],
                    "scored": report["scored"],
                    "latency_check": report["latency_check"],
                }
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, args.out / "space.md")
    print((args.out / "space.md").read_text())


def write_table(results: dict, path: Path) -> None:
    lines = [
        "# Search fronts: families trained with uniform and with layerwise sampling",
        "",
        "Written by `benchmarks/space_search.py`; "
        "each cell's `zoo search` command and output are in the folder next to this file.",
        "",
    ]
    for name, entry in results.items():
        lines += [
            f"## {name}",
            "",
            "What layerwise training costs the uniform members "
            f"(final {entry['metric'].replace('_', ' ')} of each run):",
            "",
            "| member | uniform run | layerwise run |",
            "|---|---:|---:|",
        ]
        members = entry["uniform_members"]
        for key in members["uniform"]:
            lines.append(
                f"| {fmt_member(json.loads(key))} | {members['uniform'][key]:.4f} | "
                f"{members['layerwise'].get(key, float('nan')):.4f} |"
            )
        if entry.get("random"):
            pairs = list(zip(entry["random"]["uniform"], entry["random"]["layerwise"]))
            higher = entry["metric"] == "accuracy"
            wins = sum((b["metric"] > a["metric"]) if higher else (b["metric"] < a["metric"]) for a, b in pairs)
            ties = sum(b["metric"] == a["metric"] for a, b in pairs)
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            lines += [
                "",
                f"{len(pairs)} random members of the layerwise space (seeded, the same on both families; "
                f"{mean([a['params'] for a, _ in pairs]):,.0f} parameters on average):",
                "",
                "| family trained | mean metric | worst | best |",
                "|---|---:|---:|---:|",
            ]
            for space in ("uniform", "layerwise"):
                values = [e["metric"] for e in entry["random"][space]]
                lines.append(
                    f"| {space} | {mean(values):.4f} | {min(values) if higher else max(values):.4f} | "
                    f"{max(values) if higher else min(values):.4f} |"
                )
            lines += ["", f"The layerwise-trained family is better on {wins} of {len(pairs)} members, equal on {ties}."]
        lines += [
            "",
            "Search under each budget (population, generations and seed in the commands):",
            "",
            "| budget | family trained | best member found | metric | cost | best uniform member within budget "
            "| metric | cost | latency: search / exported |",
            "|---|---|---|---:|---:|---|---:|---:|---|",
        ]
        for budget, row in entry["budgets"].items():
            for space in ("uniform", "layerwise"):
                cell = row.get(space)
                if not cell:
                    continue
                best, grid, kind = cell["best"], cell["best_uniform"], cell["kind"]
                check = cell["latency_check"]
                lat = (
                    f"{check['search_ms']:.3f} / {check['exported_ms']:.3f} ms ({100 * check['relative_error']:+.0f}%)"
                )
                uniform_text = (
                    (fmt_member(grid["member"]), f"{grid['metric']:.4f}", fmt_cost(kind, grid[kind]))
                    if grid
                    else ("none fits", "", "")
                )
                lines.append(
                    f"| {budget} | {space} | {fmt_member(best['member'])} | {best['metric']:.4f} | "
                    f"{fmt_cost(kind, best[kind])} | "
                    f"{uniform_text[0]} | {uniform_text[1]} | {uniform_text[2]} | {lat} |"
                )
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
