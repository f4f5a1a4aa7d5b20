"""Bring your own model: how good are the members of a converted timm model, and what helps?

No checkpoint can be downloaded here, so two stand-ins are trained first by a plain PyTorch loop
on the built-in digits (8x8, upscaled to 32 px): timm's ``resnet18`` (1 channel, 10 classes) and
``vit_tiny_patch16_224`` at 32 px (4 patches of 16 px and the class token). Their state dicts
are saved as safetensors and converted exactly as a downloaded checkpoint would be
(``zoo.from_timm(name, checkpoint=...)``). The stand-ins train only on images that are in the
training split of every seed, so no evaluation below sees an image a stand-in was trained on.

Per member (widths 0.25, 0.5, 0.75, 1; the ViT's width scales heads and MLP units):

1. ``none``: the converted family as it is (naive prefixes), batch norm recalibrated;
2. ``weight`` / ``activation``: importance-ordered, recalibrated, no training;
3. ``ft-all`` / ``ft-alternating``: K steps of joint fine-tuning from ``activation``;
4. ``scratch-family``: the same family from timm's random initialisation, K steps of ``all``;
   ``scratch-alone``: each member alone (``--strategy separate``) from that initialisation;
5. low-rank ViT (width 1, ranks 0.25 ... 1): ``svd`` (the factorized stand-in, no training),
   ``svd-ft-all`` (K steps joint from it) and ``svd-ft-alone`` (each rank member alone, K
   steps from it).

Rows 1-2 need no training and are deterministic (seed 0's split); the others run 3 seeds, at
K = 150 steps (about 6 epochs, where digits saturates) and K = 25 (where the starting point still
shows). Every training run is ``training.trainer.train`` (what ``zoo train --init`` runs) with
batch 64: SGD for the ResNet (lr 0.01 fine-tuning, 0.1 from scratch), AdamW for the ViT (1e-4,
1e-3); the final metric is on the whole validation split after batch-norm recalibration. A
last conversion row is an ablation, not an ``--order``: the activation criterion times the
norm of the columns that read each unit.

    python benchmarks/convert.py --only resnet --seed-list 0 --steps 25    # stand-in, conversions, seed 0, K = 25
    python benchmarks/convert.py                                           # everything: K = 150 and 25, 3 seeds
    python benchmarks/convert.py --report                                  # merge the kept runs

Each finished run is kept in ``--out/runs/<run>.json`` and not run again; the stand-ins and the
converted families live in ``--work`` (large files, not in the repository).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from training.bundle import stratified_split  # noqa: E402
from training.data import load_data  # noqa: E402
from training.evaluate import calibration_batches, evaluate  # noqa: E402
from training.trainer import TrainConfig, train  # noqa: E402
from zoo.fileio import atomic_path  # noqa: E402

WIDTHS = (0.25, 0.5, 0.75, 1.0)
RANKS = (0.25, 0.5, 0.75, 1.0)
IMG = 32
SEEDS_SPLIT = (0, 1, 2)  # the stand-ins never see a validation image of these seeds
SECTIONS = {
    # stand-in: timm name, optimizer, lr, steps; fine-tuning and scratch learning rates (zoo train)
    "resnet": dict(
        timm="resnet18", kwargs={}, optimizer="sgd", standin_lr=0.05, standin_steps=400, ft_lr=0.01, scratch_lr=0.1
    ),
    "vit": dict(
        timm="vit_tiny_patch16_224",
        kwargs={"img_size": IMG},
        optimizer="adamw",
        standin_lr=1e-3,
        standin_steps=600,
        ft_lr=1e-4,
        scratch_lr=1e-3,
    ),
}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All digits at 32 px, normalised as zoo's loader does, and the indices in every seed's
    training split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = F.interpolate(
        torch.tensor(raw.images, dtype=torch.float32).div(16).unsqueeze(1),
        size=(IMG, IMG),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    images = (images.clamp(0, 1) - 0.5) / 0.5
    targets = torch.tensor(raw.target, dtype=torch.int64)
    common = set(range(len(targets)))
    for seed in SEEDS_SPLIT:
        common &= set(stratified_split(targets, 0.1, seed)[0].tolist())
    return images, targets, torch.tensor(sorted(common))


def standin(section: str, work: Path) -> dict:
    """Train the timm model with a plain loop (SGD or AdamW, cosine, batch 64); save its state dict."""
    import timm
    from safetensors.torch import save_file

    spec = SECTIONS[section]
    path = work / f"{section}-standin.safetensors"
    record = work / f"{section}-standin.json"
    if path.exists() and record.exists():
        return json.loads(record.read_text())
    torch.manual_seed(0)
    images, targets, train_idx = digits()
    model = timm.create_model(spec["timm"], num_classes=10, in_chans=1, **spec["kwargs"])
    if spec["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=spec["standin_lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=spec["standin_lr"], weight_decay=0.05)
    steps = spec["standin_steps"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec["standin_lr"], total_steps=steps, pct_start=0.05, anneal_strategy="cos"
    )
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = train_idx[torch.randint(len(train_idx), (64,), generator=generator)]
        loss = F.cross_entropy(model(images[batch]), targets[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    wall = time.perf_counter() - started
    bundle = load_data("digits", img_size=IMG, seed=0)
    model.eval()
    with torch.no_grad():
        val = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
        accuracy = (model(val).argmax(-1) == bundle.val.targets).float().mean().item()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    result = {
        "section": section,
        "timm": spec["timm"],
        "steps": steps,
        "train_images": len(train_idx),
        "accuracy": accuracy,
        "wall_time_s": wall,
    }
    record.write_text(json.dumps(result))
    return result


def conversions(section: str, work: Path) -> list[dict]:
    """Rows 1-2 (and the low-rank ViT's ``svd``): convert, recalibrate, evaluate; keep the
    families that training starts from."""
    spec = SECTIONS[section]
    bundle = load_data("digits", img_size=IMG, seed=0)
    calibration = calibration_batches(bundle)
    checkpoint = work / f"{section}-standin.safetensors"
    rows = []
    for order in ("none", "weight", "activation"):
        started = time.perf_counter()
        family = zoo.from_timm(
            spec["timm"], checkpoint=checkpoint, order=order, calibration=calibration, widths=WIDTHS, img_size=IMG
        )
        wall = time.perf_counter() - started
        records = evaluate(family, bundle.val, family.members)
        zoo.save(family, work / f"{section}-{order}.safetensors", metadata=family.zoo_metadata)
        rows.append(_row(section, order, None, records, wall, family.zoo_metadata["converted_from"]["max_abs_diff"]))
    started = time.perf_counter()
    family = activation_times_read(
        zoo.from_timm(spec["timm"], checkpoint=checkpoint, order="none", widths=[1.0], img_size=IMG), calibration
    )
    rows.append(
        _row(
            section,
            "activation-x-read",
            None,
            evaluate(family, bundle.val, family.members),
            time.perf_counter() - started,
            None,
        )
    )
    if section == "vit":
        started = time.perf_counter()
        family = zoo.from_timm(
            spec["timm"], checkpoint=checkpoint, order="none", low_rank=True, ranks=RANKS, img_size=IMG
        )
        wall = time.perf_counter() - started
        records = evaluate(family, bundle.val, family.members)
        zoo.save(family, work / f"{section}-svd.safetensors", metadata=family.zoo_metadata)
        rows.append(_row(section, "svd", None, records, wall, family.zoo_metadata["converted_from"]["max_abs_diff"]))
    return rows


def activation_times_read(family: zoo.ElasticModel, calibration: list[torch.Tensor]) -> zoo.ElasticModel:
    """Ablation (not an ``--order``): Minitron's mean |activation| times the norm of the
    columns that read the unit (Wanda's |W| * ||X||, per unit), then the members recalibrated."""
    from zoo import importance

    found = importance.couplings(family)
    for coupling, score in zip(found, importance.activation_scores(family, found, calibration)):
        importance.permute(
            coupling, torch.sort(score * importance.read_strength(coupling), descending=True, stable=True).indices
        )
    for width in WIDTHS[:-1]:
        family.add_member(zoo.Member(width=width))
        if family.uses_batchnorm:
            zoo.recalibrate_bn(family, calibration, width=width)
    return family


def scratch_family(section: str, seed: int, work: Path) -> Path:
    """The converted family of an untrained timm model (timm's initialisation, seeded)."""
    import timm

    path = work / f"{section}-scratch-s{seed}.safetensors"
    if not path.exists():
        spec = SECTIONS[section]
        torch.manual_seed(seed)
        model = timm.create_model(spec["timm"], num_classes=10, in_chans=1, **spec["kwargs"])
        family = zoo.from_timm(model, order="none", img_size=IMG)  # the runs choose their members
        zoo.save(family, path)
    return path


def train_run(section: str, method: str, seed: int, init: Path, steps: int, out: Path, **options) -> dict:
    spec = SECTIONS[section]
    lr = spec["scratch_lr"] if method.startswith("scratch") else spec["ft_lr"]
    config = TrainConfig.from_flags(model=zoo.read_header(init)["arch"], out=str(out), data="digits", img_size=IMG,
                                    init=str(init), steps=steps, batch_size=64, lr=lr, optimizer=spec["optimizer"],
                                    eval_every=steps, seed=seed, **options)  # fmt: skip
    result = train(config)
    if not result.finished:  # stopped by a signal: keep nothing, the run is redone next time
        raise SystemExit(f"{method} (seed {seed}) stopped at step {result.steps} of {result.total_steps}")
    return _row(section, method, seed, result.metrics, result.wall_time_s, None, steps=steps)


def _row(
    section: str,
    method: str,
    seed: int | None,
    records: list[dict],
    wall: float,
    difference: float | None,
    steps: int = 0,
) -> dict:
    members = {json.dumps(r["subnet"], sort_keys=True): r["accuracy"] for r in records}
    return {
        "section": section,
        "method": method,
        "seed": seed,
        "steps": steps,
        "members": members,
        "wall_time_s": wall,
        "max_abs_diff": difference,
    }


def seed_runs(section: str, seed: int, steps: int, work: Path, kept: Path) -> None:
    """Rows 3-5 for one seed; each finished run is kept and skipped next time."""
    plans = [
        ("ft-all", None, work / f"{section}-activation.safetensors", dict(strategy="all", widths=list(WIDTHS))),
        (
            "ft-alternating",
            None,
            work / f"{section}-activation.safetensors",
            dict(strategy="alternating", widths=list(WIDTHS)),
        ),
        ("scratch-family", None, "scratch", dict(strategy="all", widths=list(WIDTHS))),
        *[("scratch-alone", w, "scratch", dict(strategy="separate", widths=[w])) for w in WIDTHS],
    ]
    if section == "vit":
        svd = work / f"{section}-svd.safetensors"
        plans += [("svd-ft-all", None, svd, dict(strategy="all", low_rank=True, widths=[1.0], ranks=list(RANKS)))]
        plans += [
            ("svd-ft-alone", r, svd, dict(strategy="separate", low_rank=True, widths=[1.0], ranks=[r])) for r in RANKS
        ]
    for method, member, init, options in plans:
        name = f"{section}-{method}{'' if member is None else f'-{member:g}'}-k{steps}-s{seed}"
        path = kept / f"{name}.json"
        if path.exists() and json.loads(path.read_text())["steps"] == steps:
            continue
        init = scratch_family(section, seed, work) if init == "scratch" else init
        with tempfile.TemporaryDirectory() as tmp:
            row = train_run(section, method, seed, init, steps, Path(tmp) / "run", **options)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(row))
        print(f"{name}: {row['members']} in {row['wall_time_s']:.0f} s", flush=True)


# ----- report --------------------------------------------------------------------------------
def _label(member: str) -> str:
    d = json.loads(member)
    return f"r{d['rank']:g}" if "rank" in d else f"w{d.get('width', 1):g}"


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


METHODS = {
    "none": "1. converted, naive prefix (--order none)",
    "weight": "2. converted, --order weight",
    "activation": "2. converted, --order activation",
    "activation-x-read": "2. ablation: mean abs activation x norm of the reading columns",
    "ft-all": "3. K steps joint fine-tuning (all) from activation",
    "ft-alternating": "3. K steps joint fine-tuning (alternating) from activation",
    "scratch-family": "4. family from scratch, K steps (all)",
    "scratch-alone": "4. each member alone from scratch, K steps",
    "svd": "5. low-rank from SVD, no training",
    "svd-ft-all": "5. low-rank, K steps joint fine-tuning (all)",
    "svd-ft-alone": "5. low-rank, each rank member fine-tuned alone, K steps",
}


def report(rows: list[dict], standins: list[dict], out: Path) -> None:
    lines = []
    for s in standins:
        lines.append(
            f"Stand-in `{s['timm']}`: {s['steps']} steps on {s['train_images']} digits at {IMG} px, "
            f"accuracy {s['accuracy']:.3f}, {s['wall_time_s']:.0f} s."
        )
    lines.append("")
    for section in SECTIONS:
        mine = [r for r in rows if r["section"] == section]
        if not mine:
            continue
        for low_rank in (False, True):
            keys = ["w0.25", "w0.5", "w0.75", "w1"] if not low_rank else ["r0.25", "r0.5", "r0.75", "r1"]
            methods = [m for m in METHODS if m.startswith("svd") == low_rank]
            table = []
            for method, steps in [
                (m, k) for m in methods for k in sorted({r["steps"] for r in mine if r["method"] == m})
            ]:
                runs = [r for r in mine if r["method"] == method and r["steps"] == steps]
                cells = {k: [] for k in keys}
                for r in runs:
                    for member, accuracy in r["members"].items():
                        label = _label(member)
                        if label in cells:
                            cells[label].append(accuracy)
                seeds = len({r["seed"] for r in runs}) if runs[0]["seed"] is not None else 0
                walls = [r["wall_time_s"] for r in runs]
                wall = f"{sum(walls) / max(seeds, 1):.0f}" + (" (4 runs)" if method.endswith("alone") else "")
                table.append(
                    f"| {METHODS[method]} | {steps or '-'} | {seeds or '-'} | "
                    + " | ".join(_cell(cells[k]) for k in keys)
                    + f" | {wall} |"
                )
            if table:
                note = (
                    "; batch norm of every member below full width recalibrated on 8 batches"
                    if section == "resnet"
                    else ""
                )
                lines += [
                    f"**{section}{' low-rank' if low_rank else ''}** (accuracy on digits validation, "
                    f"mean ± sd over seeds{note}; wall s: conversion, or training per seed)",
                    "",
                    f"| method | K | seeds | {' | '.join(keys)} | wall s per seed |",
                    "|---|---|---|---|---|---|---|---|",
                    *table,
                    "",
                ]
    with atomic_path(out / "convert.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "convert.json") as tmp:
        tmp.write_text(json.dumps({"standins": standins, "runs": rows}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(SECTIONS), action="append")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[150, 25],
        help="K, the training steps of every run (default: 150, then 25)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", type=int, nargs="*", help="run only these seeds (default: 0 .. --seeds - 1)")
    parser.add_argument("--report", action="store_true", help="only merge the kept runs into the table")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convert")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zoo-convert-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = args.out / "runs"
    kept.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    sections = args.only or list(SECTIONS)
    if not args.report:
        for section in sections:
            s = standin(section, args.work)
            with atomic_path(kept / f"{section}-standin.json") as tmp:
                tmp.write_text(json.dumps(s))
            if (
                not (kept / f"{section}-convert.json").exists()
                or not (args.work / f"{section}-activation.safetensors").exists()
            ):
                rows = conversions(section, args.work)
                with atomic_path(kept / f"{section}-convert.json") as tmp:
                    tmp.write_text(json.dumps(rows))
                print(f"{section} conversions: " + "; ".join(f"{r['method']} {r['members']}" for r in rows), flush=True)
            for steps in args.steps:
                for seed in args.seed_list if args.seed_list is not None else range(args.seeds):
                    seed_runs(section, seed, steps, args.work, kept)
    standins = [json.loads(p.read_text()) for p in sorted(kept.glob("*-standin.json"))]
    rows = [r for p in sorted(kept.glob("*-convert.json")) for r in json.loads(p.read_text())]
    rows += [json.loads(p.read_text()) for p in sorted(kept.glob("*-k[0-9]*-s[0-9]*.json"))]
    report(rows, standins, args.out)


if __name__ == "__main__":
    main()
