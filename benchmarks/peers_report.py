"""``peers.md`` and ``peers.png``: what ``peers.py`` measured, computed from its records."""

from __future__ import annotations

from pathlib import Path

from zoo.fileio import atomic_path
from zoo.search import place_labels, short_count

MARKERS = {"zoo-uniform": "o", "zoo-search": "*", "zoo-lr4-uniform": "v", "tp-magnitude": "s", "tp-taylor": "D",
           "modelopt": "^"}  # fmt: skip
COLORS = {"zoo-uniform": "tab:blue", "zoo-search": "tab:cyan", "zoo-lr4-uniform": "tab:purple",
          "tp-magnitude": "tab:orange", "tp-taylor": "tab:red", "modelopt": "tab:green"}  # fmt: skip
LABEL_OFFSETS = [(5, 4), (5, -11), (-5, 4), (-5, -11), (8, 10), (8, -16), (-8, 10), (-8, -16)]
HEADER = (
    "| target | method | seeds | test accuracy | params | FLOPs (share) | latency ms (full) | "
    "steps / passes for all three | seconds for all three |"
)


def _row(row: dict, start: dict | None) -> str:
    share = f" ({row['flops'] / start['flops']:.2f})" if start else ""
    seeds = ",".join(str(s) for s in row["seeds"])
    accuracy = f"{100 * row['accuracy']:.1f} ± {100 * row['accuracy_std']:.1f}"
    latency = f"{row['latency_ms']:.3f} ({row['full_latency_ms']:.3f})"
    cost = f"{row['steps']:.0f} / {row['passes']:.0f}"
    return (
        f"| {row['target']:g} | {row['method']} | {seeds} | {accuracy} | {short_count(row['params'])} | "
        f"{short_count(row['flops'])}{share} | {latency} | {cost} | {row['seconds']:.0f} |"
    )


def markdown(tables: dict[str, list[dict]], starts: dict[str, dict], failed: list[dict]) -> str:
    lines = ["# zoo, Torch-Pruning and Model Optimizer side by side", ""]
    lines += ["Written by `benchmarks/peers.py` from `records/` (how it was run: its docstring).", ""]
    lines += ["## Starting models", "", "| model | steps | lr | test accuracy | params | FLOPs | seconds |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for name, s in starts.items():
        lines.append(
            f"| {name} | {s['steps']} | {s['lr']:g} | {100 * s['accuracy']:.1f} | {short_count(s['params'])} | "
            f"{short_count(s['flops'])} | {s['seconds']:.0f} |"
        )
    for model, rows in tables.items():
        lines += ["", f"## {model}", "", HEADER, "|" + "---|" * 9]
        lines += [_row(row, starts.get(model)) for row in rows]
    lines += side_by_side(tables)
    if failed:
        lines += ["", "## Runs that failed (their rows are empty)", ""]
        for r in failed:
            versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
            lines += [f"- {r['model']} {r['method']} seed {r['seed']} ({versions}): `{r['error']}`"]
            lines += ["", "  ```", *("  " + line for line in r["where"].splitlines()), "  ```", ""]
    return "\n".join(lines) + "\n"


def side_by_side(tables: dict[str, list[dict]]) -> list[str]:
    """The tables above in short: per model and target every method's accuracy (mean ± std over
    its seeds) and latency; then per model and method the seeds and the cost of all three sizes."""
    if not tables:
        return []
    lines = ["", "## Side by side", "", "Test accuracy % (mean ± std over the seeds), onnxruntime latency in ms.", ""]
    present = {r["method"] for rows in tables.values() for r in rows}
    columns = [m for m in MARKERS if m != "zoo-lr4-uniform" or m in present]  # the diagnostic where it ran
    lines += ["| model | target | " + " | ".join(columns) + " |", "|" + "---|" * (2 + len(columns))]
    for model, rows in tables.items():
        for target in sorted({r["target"] for r in rows}):
            found = {r["method"]: r for r in rows if r["target"] == target}
            cells = [
                f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} ({r['latency_ms']:.2f} ms)" if r else "–"
                for r in (found.get(method) for method in columns)
            ]
            lines.append(f"| {model} | {target:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | method | seeds | steps / passes for all three | seconds for all three |",
        "|---|---|---|---|---|",
    ]
    for model, rows in tables.items():
        for method in MARKERS:
            mine = [r for r in rows if r["method"] == method]
            if mine:
                r, seeds = mine[0], ",".join(str(s) for s in mine[0]["seeds"])
                lines.append(
                    f"| {model} | {method} | {seeds} | {r['steps']:.0f} / {r['passes']:.0f} | {r['seconds']:.0f} |"
                )
    return lines


def plot(tables: dict[str, list[dict]], starts: dict[str, dict], path: Path) -> None:
    """Accuracy against onnxruntime latency, one panel per model, every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6.4 * len(tables), 4.8), dpi=120, squeeze=False)
    for ax, (model, rows) in zip(axes[0], tables.items()):
        for method in MARKERS:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target"])
            if not mine:
                continue
            xs, ys = [r["latency_ms"] for r in mine], [100 * r["accuracy"] for r in mine]
            errors = [100 * r["accuracy_std"] for r in mine]
            ax.errorbar(xs, ys, yerr=errors, marker=MARKERS[method], color=COLORS[method], linestyle=":",
                        linewidth=0.8, capsize=2, label=method)  # fmt: skip
        if model in starts:
            full = starts[model]
            latency = rows[0]["full_latency_ms"]
            ax.plot([latency], [100 * full["accuracy"]], marker="P", color="black", linestyle="", label="start (full)")
        ax.set_xlabel("onnxruntime latency, batch 1, 1 thread (ms, median)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}: sizes at 0.25 / 0.5 / 0.75 of the FLOPs")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    for ax, (model, rows) in zip(axes[0], tables.items()):
        pts = [(r["latency_ms"], 100 * r["accuracy"]) for r in rows]
        place_labels(fig, ax, pts, [f"{r['target']:g}" for r in rows], offsets=LABEL_OFFSETS, markers=pts,
                     marker_radius=4, padding=2)  # fmt: skip
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
