"""`zoo search`: the best member of a trained family for a budget, found and exported.

The command wires three layers together: ``zoo.search`` (the evolution over the family's
space), ``training.evaluate.MemberScorer`` (each member's metric on validation data, batch norm
recalibrated first) and ``export`` (latency in onnxruntime; the chosen member's ONNX file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import PRETRAINED, check_data_path, command, readable_weights

PROFILE = typer.Option(
    None,
    "--profile",
    help="A latency table (zoo profile; a file or its folder) to predict latency from; "
    "default: the one beside the family, if measured on this device.",
)


@command("search", epilog="Example: zoo search runs/resnet20/model.safetensors --budget flops=250k --out runs/search")
def search_command(
    weights: str = typer.Argument(..., help="A trained family's weights file, or a catalogue name with --pretrained."),
    pretrained: bool = PRETRAINED,
    budget: str = typer.Option(
        ...,
        "--budget",
        help="params=N, flops=N (per example; N may end in k, M, G) or latency=MS (onnxruntime, batch 1).",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder: pareto.json, pareto.png, the chosen member's .onnx and manifest.json."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Validation (and recalibration) data; default: the data the file records."
    ),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="Score members on the first N validation items (default: all)."
    ),
    population: int = typer.Option(16, "--population", min=2, help="Members per generation."),
    generations: int = typer.Option(4, "--generations", min=1, help="Generations of the evolution."),
    threads: int = typer.Option(1, "--threads", min=1, help="onnxruntime threads for latency."),
    profile: Optional[Path] = PROFILE,
    seed: int = typer.Option(0, "--seed", help="Seeds every choice of the search."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verifying the exported member against PyTorch."),
) -> None:
    """Evolutionary search (Once-for-All) for the best member within a budget; exports it."""
    path = readable_weights(weights, pretrained, "search")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; zoo search writes a folder")
    check_data_path(data, "--data")
    import zoo
    from training.evaluate import MemberScorer
    from training.model_data import data_for
    from zoo.fileio import locked_folder
    from zoo.search import Budget, Candidate, Evolution, plot_front, write_front

    chosen_budget = Budget.parse(budget)
    source = zoo.WeightsSource.open(path)
    model = source.model
    table = _latency_table(model, path, profile, threads)
    scorer = MemberScorer(model, data_for(model, "evaluate", data), limit)

    costs = _Costs(model, scorer, chosen_budget, threads, table)
    higher = scorer.metric == "accuracy"
    with locked_folder(out, "zoo search"):
        options = dict(metric=scorer.metric, higher_is_better=higher, seed=seed, progress=typer.echo)
        evolution = Evolution(model, scorer, costs, chosen_budget, **options)
        uniform = [s for s in model.members if s.is_uniform]
        result = evolution.run(population, generations, seeds=uniform)
        for candidate in result.front():  # every member on the front gets its latency too
            candidate.costs.setdefault("latency", costs.latency(candidate.member))
        grid = [Candidate(m, scorer(m), costs.measured(m), -1) for m in uniform]  # the trained ones, costed alike
        best, exported = _export_best(result, source, out, threads, not no_verify, costs.latency, table is not None)
        items = min(len(scorer.val), limit or len(scorer.val))
        record = dict(arch=model.arch, weights=str(source.path), data=_data_spec(model, data), validation_items=items)
        record.update(seed=seed, population=population, generations=generations, threads=threads)
        record.update(latency_check=exported, latency_profile=None if table is None else str(table.path))
        write_front(out / "pareto.json", result, grid, best, record)
        plot_front(out / "pareto.png", result, grid, best, f"{model.arch}: search under {chosen_budget}")
    _report_search(chosen_budget, result, best, grid, exported, out, higher)
    _report_slower(model, [*result.candidates, *grid], "predicted" if table is not None else "measured")


def _latency_table(model, weights: Path, profile: Optional[Path], threads: int):
    """The latency table to predict from: ``--profile`` (checked: another family, input size or
    thread count is an error), else the one ``zoo profile`` wrote beside the family, if any and
    measured on this device; None: latency is measured."""
    from export.profile import LatencyTable, profile_name

    if profile is not None:
        return LatencyTable.load(profile, model, threads)
    found = weights.parent / profile_name(threads, 1)
    if not found.is_file():
        return None
    try:
        table = LatencyTable.load(found, model, threads)
    except ValueError as error:  # a table for another model left in the folder: measure instead
        typer.echo(f"not using {found}: {error}")
        return None
    if not table.same_device:
        typer.echo(f"not using {found}: measured on {table.document['device']['cpu']}, not this device")
        return None
    typer.echo(f"predicting latency from {found}")
    return table


class _Costs:
    """A member's costs: parameters and FLOPs, and its latency when the budget is one (predicted
    from a latency table, else measured once the scorer gave it batch-norm statistics)."""

    def __init__(self, model, scorer, budget, threads: int, table=None):
        self.model, self.scorer, self.budget, self.threads, self.table = model, scorer, budget, threads, table

    def latency(self, member) -> float:
        from export.latency import member_latency

        if self.table is not None:
            return self.table(member)
        self.scorer.prepare(member)
        return member_latency(self.model, member, self.threads)

    def __call__(self, member) -> dict[str, float]:
        import zoo

        model = self.model
        costs = {"params": float(zoo.count_params(model, member)), "flops": float(zoo.count_flops(model, member))}
        if self.budget.kind == "latency":
            costs["latency"] = self.latency(member)
        return costs

    def measured(self, member) -> dict[str, float]:
        """Every cost, latency included."""
        costs = self(member)
        costs.setdefault("latency", self.latency(member))
        return costs


def _report_search(budget, result, best, grid, exported: dict, out: Path, higher: bool) -> None:
    """The chosen member, the best uniform member within the budget, the exported file's latency."""
    typer.echo(
        f"best within {budget}: {best.member} — {result.metric} {best.metric:.4f}, {best.costs['params']:,.0f} "
        f"params, {best.costs['flops'] / 1e6:.2f} MFLOPs, {best.costs['latency']:.3f} ms"
    )
    same_cost = [g for g in grid if g.costs[budget.kind] <= budget.limit]
    if same_cost:
        top = max(same_cost, key=lambda g: g.metric if higher else -g.metric)
        typer.echo(f"best uniform member within the budget: {top.member} — {result.metric} {top.metric:.4f}")
    how = "predicted" if exported["predicted"] else "search measured"
    typer.echo(
        f"latency of the exported file on its own: {exported['exported_ms']:.3f} ms measured, {how} "
        f"{exported['search_ms']:.3f} ms ({100 * exported['relative_error']:+.1f}%)"
    )
    typer.echo(
        f"wrote {out / 'pareto.json'}, {out / 'pareto.png'}, {exported['file']} and {out / 'manifest.json'} "
        f"({len(result.candidates)} members scored, {len(result.front())} on the front)"
    )


def _report_slower(model, candidates, how: str) -> None:
    """Smaller is never slower: a warning for every member whose latency exceeds that of a member
    containing it (beyond timing noise)."""
    from zoo.space import SLOWER_TOLERANCE, slower_containers

    latency = {c.member: c.costs["latency"] for c in candidates if "latency" in c.costs}
    for small, big, small_ms, big_ms in slower_containers(model, latency):
        typer.echo(
            f"smaller is slower: {small} {how} {small_ms:.3f} ms, more than {big} which contains it "
            f"({big_ms:.3f} ms, +{100 * (small_ms / big_ms - 1):.0f}%, beyond {100 * SLOWER_TOLERANCE:.0f}% noise)"
        )


def _data_spec(model, data: Optional[str]) -> Optional[str]:
    from zoo.members import recorded

    return data or recorded(getattr(model, "zoo_metadata", {}), "data")


def search_file_name(arch: str, member, kind: str, costs: dict[str, float]) -> str:
    """The chosen member's file: what it keeps and what it costs, readable (no digest), e.g.
    ``slim_resnet20_depth1-2-3_width0p5-1-1_41p2k-params.onnx``."""
    from zoo.search import short_count

    def numbers(value) -> str:
        return "-".join(f"{v:g}".replace(".", "p") for v in (value if isinstance(value, list) else [value]))

    parts = [f"{field}{numbers(value)}" for field, value in sorted(member.to_dict().items())] or ["largest"]
    cost = f"{costs[kind]:.3g}ms" if kind == "latency" else f"{short_count(costs[kind])}-{kind}"
    return f"{arch}_{'_'.join(parts)}_{cost.replace('.', 'p')}.onnx"


def _export_best(result, source, out: Path, threads: int, verify: bool, latency, predicted: bool = False):
    """Export the best member; under a latency budget, re-measure the exported file on its own
    and fall back to the next best (up to three) if it does not meet the budget. ``predicted``:
    the search's latencies came from a table."""
    from export.latency import session_latency
    from export.onnx_export import export_members

    ranked = result.ranked()
    for best in ranked[:3]:
        if "latency" not in best.costs:  # measured once: setdefault would measure it again for nothing
            best.costs["latency"] = latency(best.member)
        scored = {best.member.key: {result.metric: best.metric}}  # on the search's validation items
        name = {best.member.key: search_file_name(source.model.arch, best.member, result.budget.kind, best.costs)}
        results, manifest = export_members(source, out, [best.member], name, scored, verify_output=verify)
        path = results[0].path
        example = source.model.example_input(1).numpy()
        measured = session_latency(path, example, threads)
        check = {
            "file": str(path),
            "predicted": predicted,
            "search_ms": best.costs["latency"],
            "exported_ms": measured,
            "relative_error": measured / best.costs["latency"] - 1.0,
        }
        if result.budget.kind != "latency" or measured <= result.budget.limit:
            return best, check
        path.unlink()  # with its manifest: a member over the budget leaves no file behind
        manifest.unlink()
    raise ValueError(
        f"the best members found measured over {result.budget} once exported (last: {measured:.3f} ms); measured "
        f"latency is noisy here: retry, or relax the budget"
    )
