"""zoo against the tools people use today, side by side: Torch-Pruning and NVIDIA Model Optimizer.

zoo's promise: one joint run gives every size at once, as good as making each size separately
with today's tools. Measured here from the same trained starting models (zoo's ResNet-20 and
timm's resnet18, trained here by a plain PyTorch loop) to 0.25, 0.5 and 0.75 of their FLOPs:

- ``zoo-uniform`` / ``zoo-search``: convert, one joint fine-tuning run of K steps with zoo's
  trainer, then the widest uniform member within each target / the member ``zoo search`` finds;
- ``tp-magnitude`` / ``tp-taylor``: Torch-Pruning to each target, each fine-tuned K steps;
- ``modelopt``: Model Optimizer's FastNAS to each target, each fine-tuned K steps.

The same optimizer (momentum SGD, lr 0.02, weight decay 5e-4), schedule (cosine, 5% warmup),
batch (64) and data for all (``peers_data``: hard digits, and why); K steps per fine-tuning run
(zoo's one run draws four members per step: its passes are 4K, the peers' 3K). Defaults sized
for a 2-core CPU shared with other jobs: starting models trained 600 steps (5.5 epochs), K = 150. Reported per
target and method: test accuracy of the exported ONNX file (mean ± std over seeds), parameters,
FLOPs (one counter for all), onnxruntime latency (batch 1, one thread, interleaved with the full
model's), and the steps, passes and seconds spent to obtain all three sizes.

Every (model, method, seed) is one record file under ``OUT/records``, written when it finishes:
a stopped run resumes where it stopped, and the report is always recomputed from the records.

    pip install -e ".[peers]"
    nice python benchmarks/peers.py --seeds 0 1 2          # -> benchmarks/results/peers/ (work: runs/peers)
    python benchmarks/peers.py --report                    # peers.md and peers.png from the records
    python benchmarks/peers.py --models resnet20 --methods zoo --seeds 1   # one piece
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.fileio import atomic_path  # noqa: E402

MODELS = ("resnet20", "resnet18")
METHODS = ("zoo", "tp-magnitude", "tp-taylor", "modelopt")
# A diagnostic, run only when named: zoo's trainer sums the gradients of a step's four passes, so
# at the peers' learning rate its shared weights take steps about four times theirs; zoo-lr4
# trains at a quarter of it (uniform members only).
VARIANTS = ("zoo-lr4",)
LABELS = ("zoo-uniform", "zoo-search", "zoo-lr4-uniform", "tp-magnitude", "tp-taylor", "modelopt")  # rows per target
START_LR = {"resnet20": 0.1, "resnet18": 0.05}  # from scratch, --start-steps steps
LATENCY_REPEATS = 200
PEERS = ("torch-pruning", "nvidia-modelopt", "torch", "timm", "onnxruntime")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "peers"
DEFAULT_WORK = Path(__file__).resolve().parents[1] / "runs" / "peers"  # git-ignored; /tmp is wiped by a restart


def versions() -> dict[str, str]:
    """The peers' and runtimes' versions, and the CPU (a starting model retrained on another CPU
    is another model: 92.9% once, 91.9% retrained on an AMD EPYC with the same code and seed)."""
    from machine import cpu

    found = {"cpu": cpu()["model"]}
    for name in PEERS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def record_path(out: Path, model: str, method: str, seed: int) -> Path:
    return out / "records" / model / method / f"seed{seed}.json"


def read_records(out: Path) -> list[dict]:
    """Every finished record under ``out`` (start models and method runs, failed ones too)."""
    return [json.loads(p.read_text()) for p in sorted((out / "records").rglob("*.json"))]


def latency(files: dict[str, str]) -> dict[str, float]:
    """Median ms per ONNX file at batch 1, one thread, every file timed in turn per repeat."""
    from export.benchmark import onnx_session, time_interleaved

    runs = {}
    for key, path in files.items():
        session = onnx_session(path, threads=1)
        feed = {session.get_inputs()[0].name: torch.zeros(1, 3, 32, 32).numpy()}
        runs[key] = lambda session=session, feed=feed: session.run(None, feed)
    return time_interleaved(runs, LATENCY_REPEATS, warmup=5)


def train_start(model_name: str, spec: str, work: Path, out: Path, steps: int) -> dict:
    """The starting model (trained once, seed 0, plain loop): its record, pointing at its weights
    and ONNX file under ``work``; retrained (and checked against the record) when they are missing."""
    from peers_data import count_flops, count_params, export_plain, onnx_accuracy, start_model, train_plain
    from safetensors.torch import save_file

    path = record_path(out, model_name, "start", 0)
    weights, onnx = work / model_name / "start.safetensors", work / model_name / "start.onnx"
    recorded = json.loads(path.read_text()) if path.exists() else None
    if recorded and weights.exists() and onnx.exists():
        return dict(recorded, weights=str(weights), onnx=str(onnx))
    torch.manual_seed(0)
    model = start_model(model_name)
    settings = dict(steps=steps, lr=START_LR[model_name])
    seconds = train_plain(model, spec, steps, settings["lr"], 64, seed=0)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    export_plain(model, onnx)
    record = dict(model=model_name, method="start", seed=0, weights=str(weights), onnx=str(onnx), **settings)
    record.update(accuracy=onnx_accuracy(onnx, spec), params=count_params(model), flops=count_flops(model))
    record.update(seconds=seconds, versions=versions())
    if recorded is None:
        write_json(path, record)
        return record
    # the work folder was lost (it lives outside the records): retrained, it must be the same model
    same = ("steps", "lr", "accuracy", "params", "flops")
    if any(record[key] != recorded[key] for key in same):
        changed = {key: (recorded[key], record[key]) for key in same if record[key] != recorded[key]}
        raise RuntimeError(f"{model_name}'s starting model retrained differs from its record: {changed}")
    return dict(recorded, weights=str(weights), onnx=str(onnx))


def load_start(record: dict) -> torch.nn.Module:
    from peers_data import start_model
    from safetensors.torch import load_file

    model = start_model(record["model"])
    model.load_state_dict(load_file(record["weights"]))
    return model.eval()


def run_method(method: str, start: dict, specs: tuple[str, str], work: Path, seed: int, steps: int) -> dict:
    """One method from the starting model to all three sizes (a record without latency yet)."""
    import peers_methods as m

    plain, (spec, search_spec) = load_start(start), specs
    if method == "zoo":
        return m.run_zoo(start["model"], plain, spec, search_spec, work, seed, steps)
    if method == "zoo-lr4":
        lr = m.FINETUNE_LR / m.SANDWICH_PASSES
        return m.run_zoo(start["model"], plain, spec, search_spec, work, seed, steps, lr, method, search=False)
    if method == "modelopt":
        return m.run_modelopt(start["model"], plain, spec, search_spec, work, seed, steps)
    return m.run_torch_pruning(plain, method.removeprefix("tp-"), spec, work, seed, steps)


def measure(model: str, method: str, seed: int, args, specs: tuple[str, str]) -> dict:
    """Run one (model, method, seed), time its files against the full model's, write its record;
    a failure is recorded too (its error and the versions), and not retried without --retry."""
    path = record_path(args.out, model, method, seed)
    if path.exists() and not (args.retry and "error" in json.loads(path.read_text())):
        return json.loads(path.read_text())
    start = train_start(model, specs[0], args.work, args.out, args.start_steps)
    record = dict(model=model, method=method, seed=seed, steps=args.steps, versions=versions())
    began = time.perf_counter()
    try:
        record.update(run_method(method, start, specs, args.work / model / method / f"seed{seed}", seed, args.steps))
    except Exception as err:  # a peer's failure is a result: recorded exactly, its rows left empty
        record.update(error=f"{type(err).__name__}: {err}", where=traceback.format_exc(limit=-3).strip())
        write_json(path, record)
        print(f"{model} {method} seed {seed}: failed: {record['error']}", flush=True)
        return record
    files = {f"{r['method']}@{r['target']}": r["onnx"] for r in record["rows"]}
    timed = latency({**files, "full": start["onnx"]})
    for row in record["rows"]:
        row["latency_ms"] = timed[f"{row['method']}@{row['target']}"]
    record.update(full_latency_ms=timed["full"], wall_s=time.perf_counter() - began)
    write_json(path, record)
    print(f"{model} {method} seed {seed}: done in {record['wall_s']:.0f} s", flush=True)
    return record


def summarize(records: list[dict]) -> dict[str, list[dict]]:
    """Per model, one row per (target, method label): accuracy mean and std over the seeds that
    finished, parameters, FLOPs, latency (medians over seeds) and the cost of all three sizes."""
    tables: dict[str, list[dict]] = {}
    runs = [r for r in records if r.get("method") != "start" and "rows" in r]
    for model in MODELS:
        mine = [r for r in runs if r["model"] == model]
        rows = []
        for target in sorted({row["target"] for r in mine for row in r["rows"]}):
            for label in LABELS:
                found = [
                    (r, row) for r in mine for row in r["rows"] if row["method"] == label and row["target"] == target
                ]
                if found:
                    rows.append(_summary_row(label, target, found))
        if rows:
            tables[model] = rows
    return tables


def _summary_row(label: str, target: float, found: list[tuple[dict, dict]]) -> dict:
    accuracies = [row["accuracy"] for _, row in found]
    cost = [r["cost"][label] for r, _ in found]
    return dict(
        method=label,
        target=target,
        seeds=sorted(r["seed"] for r, _ in found),
        accuracy=statistics.mean(accuracies),
        accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        params=statistics.median(row["params"] for _, row in found),
        flops=statistics.median(row["flops"] for _, row in found),
        latency_ms=statistics.median(row["latency_ms"] for _, row in found),
        full_latency_ms=statistics.median(r["full_latency_ms"] for r, _ in found),
        steps=statistics.mean(c["steps"] for c in cost),
        passes=statistics.mean(c["passes"] for c in cost),
        seconds=statistics.mean(c["seconds"] for c in cost),
    )


def failures(records: list[dict]) -> list[dict]:
    return [r for r in records if "error" in r]


def write_report(out: Path) -> None:
    """``peers.md`` (tables, failures, settings) and ``peers.png`` from the records alone."""
    from peers_report import markdown, plot

    records = read_records(out)
    starts = {r["model"]: r for r in records if r.get("method") == "start"}
    tables = summarize(records)
    with atomic_path(out / "peers.md") as tmp:
        tmp.write_text(markdown(tables, starts, failures(records)))
    if tables:
        plot(tables, starts, out / "peers.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS + VARIANTS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="K: fine-tuning steps of every run")
    parser.add_argument("--start-steps", type=int, default=600, help="training steps of the starting models")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="records, peers.md and peers.png")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="data, weights and ONNX files")
    parser.add_argument("--retry", action="store_true", help="run again the records that failed")
    parser.add_argument("--report", action="store_true", help="only rewrite peers.md and peers.png from the records")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.report:
        from peers_data import make_data

        specs = make_data(args.work)
        for seed in args.seeds:
            for model in args.models:
                for method in args.methods:
                    measure(model, method, seed, args, specs)
                    write_report(args.out)
    write_report(args.out)


if __name__ == "__main__":
    main()
