"""How well does a latency table (``zoo profile``) predict members it never measured?

For each family: build it at a small input (random weights: latency does not depend on
them), measure its table (``export.profile.measure``), then draw random members
(``model.sample_member``, seeded), predict each from the table and measure it for real as
``zoo search`` does (the whole member exported with the TorchScript exporter, median of
onnxruntime runs). Reports the median and worst relative error, and the "smaller is never
slower" violations among the members measured (``zoo.space.slower_containers``).

    nice python benchmarks/latency_predictor.py --size 64 --members 20

Partial results are kept (``OUT/latency_predictor/<arch>_<size>px.json`` for the table,
``...members.jsonl`` for the members measured), so a run that is stopped resumes where it was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ("slim_resnet50", "slim_mobilenetv2", "slim_vit_small")


def family_results(name: str, args, folder: Path) -> dict:
    import torch

    import zoo
    from export.latency import model_latency
    from export.profile import LatencyTable, built_member, measure, write_profile

    torch.set_num_threads(1)
    extra = {"round_channels": args.round_channels} if args.round_channels else {}
    model = zoo.create_model(name, img_size=args.size, **extra)
    tag = f"{name}_{args.size}px" + (f"_round{args.round_channels}" if args.round_channels else "")
    table_path = folder / f"{tag}.json"
    if not table_path.exists():
        started = time.perf_counter()
        document = measure(model, threads=1, batch=1, repeats=args.repeats, progress=lambda t: print(name, t))
        document["seconds"] = time.perf_counter() - started
        write_profile(document, table_path)
    table = LatencyTable.load(table_path, model, threads=1)
    done_path = folder / f"{tag}.members.jsonl"
    done = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.exists() else []
    generator = torch.Generator().manual_seed(args.seed)
    members = [model.resolve_member(model.sample_member(generator)) for _ in range(args.members)]
    members += [m for m in model.members if m not in members]  # the uniform ones: they contain many
    for member in members[len(done) :]:
        predicted = table(member)
        measured = model_latency(built_member(model, member), threads=1, repeats=args.repeats)
        row = {"member": member.to_dict(), "predicted_ms": predicted, "measured_ms": measured}
        done.append(row)
        with done_path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        print(f"{name}: {member}: predicted {predicted:.3f} ms, measured {measured:.3f} ms", flush=True)
    started = time.perf_counter()
    for member in members:
        table(member)
    return summary(model, tag, table.document, done, args.members, (time.perf_counter() - started) / len(members))


def summary(model, tag: str, document: dict, rows: list[dict], drawn: int, predict_s: float) -> dict:
    """Errors over the ``drawn`` random members; "smaller is slower" pairs over every member
    measured (the uniform ones too)."""
    from zoo import Member
    from zoo.space import slower_containers

    errors = [row["predicted_ms"] / row["measured_ms"] - 1.0 for row in rows[:drawn]]
    measured = {model.resolve_member(Member.from_dict(r["member"])): r["measured_ms"] for r in rows}
    flagged = slower_containers(model, measured)
    uniform = {str(m): round(ms, 3) for m, ms in measured.items() if m.is_uniform}
    return {
        "family": tag,
        "input": document["input"],
        "members": len(errors),
        "uniform_ms": uniform,
        "mean_measured_ms": statistics.fmean(r["measured_ms"] for r in rows[:drawn]),
        "median_abs_error": statistics.median(abs(e) for e in errors),
        "worst_abs_error": max(abs(e) for e in errors),
        "mean_error": statistics.fmean(errors),
        "profile_s": document.get("seconds"),
        "profile_members": document["members_measured"],
        "predict_ms": 1000 * predict_s,
        "measured_ms_range": [min(r["measured_ms"] for r in rows[:drawn]), max(r["measured_ms"] for r in rows[:drawn])],
        "slower_than_container": len(flagged),
        "fit": document["fit"],
    }


def write_table(results: list[dict], path: Path, args) -> None:
    lines = [
        "# Latency predicted from `zoo profile` tables against measured",
        "",
        f"Random members (`model.sample_member`, seed {args.seed}), batch 1, 1 thread, onnxruntime, "
        f"median of {args.repeats} runs; written by `benchmarks/latency_predictor.py`.",
        "Goal: median |error| <= 10%, worst <= 25%."
        + (f" Families built with `round_channels={args.round_channels}`." if args.round_channels else ""),
        "",
        "| family | input | members | median abs error | worst abs error | mean error | measured ms (mean) | "
        "profile (members, s) | prediction | smaller-slower pairs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["measured_ms_range"]
        seconds = "-" if r["profile_s"] is None else f"{r['profile_s']:.0f}"
        lines.append(
            f"| {r['family']} | {r['input'][-1]} px | {r['members']} | {100 * r['median_abs_error']:.1f}% | "
            f"{100 * r['worst_abs_error']:.1f}% | {100 * r['mean_error']:+.1f}% | {low:.2f}-{high:.2f} "
            f"({r['mean_measured_ms']:.2f}) | "
            f"{r['profile_members']}, {seconds} | {r['predict_ms']:.2f} ms | {r['slower_than_container']} |"
        )
    lines += ["", "Uniform members measured (ms): " + "; ".join(f"{r['family']}: {r['uniform_ms']}" for r in results)]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", help="Catalogue names (default: ResNet-50, MobileNetV2, ViT-S).")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-channels", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    folder = args.out / "latency_predictor"
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    suffix = f"_round{args.round_channels}" if args.round_channels else ""
    for name in args.family or FAMILIES:
        results.append(family_results(name, args, folder))
        (folder / f"summary{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, args.out / f"latency_predictor{suffix}.md", args)


if __name__ == "__main__":
    main()
