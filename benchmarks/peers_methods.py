"""The methods ``peers.py`` compares, each from the same trained starting model to three sizes.

- ``zoo``: convert the starting model to a family (timm's resnet18 through ``zoo.from_timm``;
  the plain ResNet-20 copied into ``slim_resnet20``, importance-ordered and batch-norm
  recalibrated as ``from_timm`` does), one joint run of zoo's trainer (``training.trainer.train``,
  what ``zoo train`` runs: sandwich over the layerwise space), then per FLOP target the widest
  uniform member within it (``zoo-uniform``) and what ``zoo search`` (the command, run as a
  process) finds under the same budget (``zoo-search``).
- ``tp-magnitude`` / ``tp-taylor``: Torch-Pruning's ``MetaPruner`` with L2-magnitude or Taylor
  importance, per target pruned step by step (1% of every layer's channels per step) until the
  FLOPs are within the target, then fine-tuned.
- ``modelopt``: NVIDIA Model Optimizer's FastNAS (``mtp.prune(mode="fastnas")``) per target,
  scored on the validation digits, then fine-tuned.

Each returns a record: per target the ONNX file and its accuracy, parameters and FLOPs, plus
the steps, forward/backward passes and seconds spent to obtain all three sizes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from peers_data import (
    SIZE,
    WEIGHT_DECAY,
    batches,
    count_flops,
    count_params,
    export_plain,
    onnx_accuracy,
    train_plain,
)

import zoo
from training.data import load_data

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.25, 0.5, 0.75)
BATCH_SIZE = 64
FINETUNE_LR = 0.02
ARCH = {"resnet20": "slim_resnet20", "resnet18": "slim_resnet18"}
SANDWICH_PASSES = 4  # largest, smallest and zoo's default two random members per step
PRUNE_STEP = 0.01  # Torch-Pruning: the share of every layer's channels one pruning step removes
SEARCH = dict(population=8, generations=3)
CHANNEL_DIVISOR = {"resnet20": 4, "resnet18": 8}  # zoo's rounding of channel counts, given to FastNAS too


def calibration_batches(spec: str, count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches (augmented as in training) for importance and batch-norm statistics."""
    stream = batches(load_data(spec, seed=0).train, BATCH_SIZE, seed=0)
    return [next(stream) for _ in range(count)]


def uniform_widths(arch: str) -> dict[float, float]:
    """Per FLOP target, the widest uniform width (in 1/64 steps) whose member is within it."""
    model = zoo.create_model(arch, num_classes=10, img_size=SIZE)
    full = zoo.count_flops(model)
    widths = {}
    for target in TARGETS:
        fits = [k / 64 for k in range(1, 65) if zoo.count_flops(model, zoo.Member(width=k / 64)) <= target * full]
        widths[target] = max(fits)
    return widths


def plain_to_family(plain: torch.nn.Module, widths: list[float], calibration: list) -> zoo.ElasticModel:
    """The plain ResNet-20 as a ``slim_resnet20`` family, the steps ``zoo.from_timm`` takes: its
    tensors copied under zoo's names into the full-width family (batch-norm statistics into the
    full member's), channels ordered by weight importance, then the family with every width
    made from it and the narrower members' statistics estimated on ``calibration``."""
    dense = zoo.create_model("slim_resnet20", num_classes=10, widths=[1.0])
    full = dense.largest.key
    state = {}
    for name, tensor in plain.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            state[f"{name}_{full}"] = tensor
        elif not name.endswith("num_batches_tracked"):
            state[name] = tensor
    dense.load_state_dict(state)
    zoo.importance.reorder(dense, "weight")
    family = zoo.create_model("slim_resnet20", num_classes=10, widths=widths)
    missing, unexpected = family.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or any(full in k or "running" not in k for k in missing):
        raise ValueError(f"ResNet-20 does not fit slim_resnet20: missing {missing}, unexpected {unexpected}")
    for width in widths:
        if width < 1:
            zoo.recalibrate_bn(family, calibration, width=width)
    family.set_member(family.largest)
    with torch.no_grad():
        difference = (family.eval()(calibration[0]) - plain.eval()(calibration[0])).abs().max().item()
    if difference > 1e-3:
        raise ValueError(f"slim_resnet20's full member differs from the plain ResNet-20 by {difference}")
    return family


def convert(name: str, plain: torch.nn.Module, widths: list[float], spec: str, path: Path) -> Path:
    """The starting model as a zoo family file (what ``zoo train --init`` reads)."""
    calibration = [inputs for inputs, _ in calibration_batches(spec)]
    if name == "resnet20":
        family = plain_to_family(plain, widths, calibration)
    else:
        family = zoo.from_timm(plain, order="weight", calibration=calibration, widths=widths, img_size=SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    zoo.save(family, path)
    return path


def member_row(family: zoo.ElasticModel, member: zoo.Member, onnx: Path, spec: str, label: str) -> dict:
    """Accuracy of the exported file; parameters and FLOPs of the sliced member."""
    sliced = zoo.slice(family, member)
    return dict(
        method=label,
        member=member.to_dict(),
        onnx=str(onnx),
        accuracy=onnx_accuracy(onnx, spec),
        params=count_params(sliced),
        flops=count_flops(sliced),
    )


def zoo_search(weights: Path, budget: float, spec: str, out: Path, seed: int) -> tuple[zoo.Member, Path]:
    """``zoo search`` as a user runs it, on the validation digits; the chosen member and its file."""
    command = [sys.executable, "-m", "cli", "search", str(weights), "--budget", f"flops={budget:.0f}"]
    command += ["--out", str(out), "--data", spec, "--seed", str(seed), "--threads", "1"]
    command += ["--population", str(SEARCH["population"]), "--generations", str(SEARCH["generations"])]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"zoo search failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    report = json.loads((out / "pareto.json").read_text())
    return zoo.Member.from_dict(report["best"]["member"]), Path(report["latency_check"]["file"])


def run_zoo(
    name: str, plain: torch.nn.Module, spec: str, search_spec: str, work: Path, seed: int, steps: int,
    lr: float = FINETUNE_LR, label: str = "zoo", search: bool = True,
) -> dict:  # fmt: skip
    """Convert, train the family jointly once, then the uniform and (``search``) the searched
    member per target, rows labelled ``label``-uniform and ``label``-search."""
    from export.onnx_export import export_file
    from training.trainer import TrainConfig, train

    arch, widths = ARCH[name], uniform_widths(ARCH[name])
    start = time.perf_counter()
    family_path = convert(name, plain, sorted({*widths.values(), 1.0}), spec, work / "family.safetensors")
    config = TrainConfig.from_flags(
        arch, str(work / "train"), init=str(family_path), seed=seed, data=spec, strategy="sandwich",
        space="layerwise", widths=sorted({*widths.values(), 1.0}), steps=steps, batch_size=BATCH_SIZE,
        optimizer="sgd", lr=lr, weight_decay=WEIGHT_DECAY, eval_every=steps, overwrite=True,
    )  # fmt: skip
    result = train(config)
    if result.model_path is None:  # stopped by a signal after a checkpoint: no record, the next run redoes it
        raise KeyboardInterrupt(f"zoo train stopped at step {result.steps} of {result.total_steps}")
    trained = result.model_path
    train_s = time.perf_counter() - start
    family = zoo.load(trained)
    full_flops = zoo.count_flops(family, family.largest)
    rows, search_s = [], 0.0
    for target in TARGETS:
        member = zoo.Member(width=widths[target])
        onnx = export_file(trained, work / f"uniform_{target}.onnx", width=widths[target]).path
        rows.append(dict(member_row(family, member, onnx, spec, f"{label}-uniform"), target=target))
        if not search:
            continue
        begin = time.perf_counter()
        found, onnx = zoo_search(trained, target * full_flops, search_spec, work / f"search_{target}", seed)
        search_s += time.perf_counter() - begin
        zoo.recalibrate_bn(family, [inputs for inputs, _ in calibration_batches(spec)], found)
        rows.append(dict(member_row(family, found, onnx, spec, f"{label}-search"), target=target))
    passes = steps * SANDWICH_PASSES
    cost = {f"{label}-uniform": dict(steps=steps, passes=passes, seconds=train_s)}
    if search:
        cost[f"{label}-search"] = dict(steps=steps, passes=passes, seconds=train_s + search_s)
    return dict(rows=rows, cost=cost)


def _tp_prune(model: torch.nn.Module, importance: str, target: float, calibration: list) -> torch.nn.Module:
    """Torch-Pruning to within ``target`` of the FLOPs: uniform per-layer ratios, step by step."""
    import torch_pruning as tp

    chosen = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
    classifier = model.fc  # both starting models name their classifier fc; its outputs are the classes
    total = round(0.95 / PRUNE_STEP)
    example = torch.zeros(1, 3, SIZE, SIZE)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=chosen, pruning_ratio=0.95, iterative_steps=total, ignored_layers=[classifier]
    )
    full = count_flops(model)
    model.eval()
    for step in range(total):
        if importance == "taylor":
            model.zero_grad()
            inputs, targets = calibration[step % len(calibration)]
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        pruner.step()
        if count_flops(model) <= target * full:
            return model
    raise RuntimeError(f"Torch-Pruning did not reach {target:g} of the FLOPs")


def _finetuned_row(model, method: str, target: float, spec: str, work: Path, seed: int, steps: int) -> dict:
    """Fine-tune a pruned plain model ``steps`` steps, export it, measure it."""
    train_plain(model, spec, steps, FINETUNE_LR, BATCH_SIZE, seed)
    start = time.perf_counter()
    onnx = export_plain(model, work / f"{method}_{target}.onnx")
    row = dict(method=method, target=target, onnx=str(onnx), accuracy=onnx_accuracy(onnx, spec))
    row.update(params=count_params(model), flops=count_flops(model))
    return dict(row, measure_s=time.perf_counter() - start)


def run_torch_pruning(plain, importance: str, spec: str, work: Path, seed: int, steps: int) -> dict:
    """Torch-Pruning with ``importance`` (magnitude or taylor) to each target, each fine-tuned."""
    method, rows, start = f"tp-{importance}", [], time.perf_counter()
    calibration = calibration_batches(spec)
    for target in TARGETS:
        torch.manual_seed(seed)
        pruned = _tp_prune(copy.deepcopy(plain), importance, target, calibration)
        rows.append(_finetuned_row(pruned, method, target, spec, work, seed, steps))
    seconds = time.perf_counter() - start - _measuring_seconds(rows)
    return dict(rows=rows, cost={method: dict(steps=3 * steps, passes=3 * steps, seconds=seconds)})


def _measuring_seconds(rows: list[dict]) -> float:
    """Time that was not spent obtaining a model (export and test accuracy), recorded per row."""
    return sum(row.pop("measure_s", 0.0) for row in rows)


def _val_score(spec: str):
    """FastNAS's score: accuracy on the validation digits (what zoo search scores on too)."""
    val = load_data(spec).val
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.stack([val[i][1] for i in range(len(val))])

    @torch.no_grad()
    def score(model: torch.nn.Module) -> float:
        model.eval()
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(250), labels.split(250)))
        return right / len(labels)

    return score


def fastnas_rules(divisor: int) -> dict:
    """FastNAS's default search space with channel counts rounded to ``divisor`` instead of its
    default 32, under which a ResNet-20 (16 to 64 channels) can only halve its last stage and no
    target below 0.8 of the FLOPs is reachable ("NOT all constraints can be satisfied")."""
    from modelopt.torch.prune.fastnas import FastNASConfig

    rules = FastNASConfig().model_dump()
    for rule in rules.values():
        for config in rule.values():
            for key in ("channel_divisor", "feature_divisor"):
                if key in config:
                    config[key] = divisor
    return rules


def run_modelopt(name: str, plain, spec: str, search_spec: str, work: Path, seed: int, steps: int) -> dict:
    """Model Optimizer's FastNAS to each target (one search state, reused), each fine-tuned."""
    import modelopt.torch.prune as mtp

    rows, start = [], time.perf_counter()
    loader = calibration_batches(spec)
    config = {"data_loader": loader, "score_func": _val_score(search_spec), "checkpoint": str(work / "fastnas.pth")}
    mode = [("fastnas", fastnas_rules(CHANNEL_DIVISOR[name]))]
    for target in TARGETS:
        torch.manual_seed(seed)
        constraint = {"flops": f"{round(100 * target)}%"}
        pruned, _ = mtp.prune(copy.deepcopy(plain), mode, constraint, torch.zeros(1, 3, SIZE, SIZE), config)
        rows.append(_finetuned_row(pruned, "modelopt", target, spec, work, seed, steps))
    seconds = time.perf_counter() - start - _measuring_seconds(rows)
    return dict(rows=rows, cost={"modelopt": dict(steps=3 * steps, passes=3 * steps, seconds=seconds)})
