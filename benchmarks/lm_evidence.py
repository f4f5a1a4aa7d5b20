"""Evidence for language-model families: members of a converted "pretrained" Llama-layout model,
scored on held-out text in bits per byte, (a) sliced with no training, (b) after K steps of joint
fine-tuning of the family with ``zoo train``, (c) each fine-tuned alone for K steps; and
Minitron's question, width-reduced against depth-reduced members of equal parameter counts.

    python benchmarks/lm_pretrain.py      # first: the stand-in checkpoint (a transformers folder)
    python benchmarks/lm_evidence.py [--seeds 0 1 2] [--steps K]

The checkpoint is ``lm_pretrain.py``'s (the standard library's top-level modules as text, a BPE
tokenizer trained on them); the family is ``zoo convert FOLDER --order activation`` of it. Every
run is a ``zoo train`` process (the one trainer) on a slice of the training text; every score is
zoo's ``evaluate`` on the first ``EVAL_WINDOWS`` windows of the held-out text (files never
trained on), through the family's own tokenizer and token cache. One JSON per run under
``benchmarks/results/lm/runs/``: a stopped run resumes, finished ones are not redone. The
summary goes to ``benchmarks/results/lm/evidence-K{K}-lr{LR}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import zoo  # noqa: E402
from training.data import FileTokenIds  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.text_cache import TOKEN_RECORD, cached_tokens  # noqa: E402
from zoo.fileio import atomic_path  # noqa: E402
from zoo.tokenizer import recorded_tokenizer_files  # noqa: E402

WORK = Path(os.environ.get("ZOO_LM_WORK", "/tmp/zoo-lm-evidence"))
RESULTS = Path(os.environ.get("ZOO_LM_RESULTS", REPO / "benchmarks" / "results" / "lm"))
SEQ, BATCH = 128, 8
EVAL_WINDOWS = int(
    os.environ.get("ZOO_LM_EVAL_WINDOWS", 96)
)  # held-out windows of SEQ tokens scored per member (12,288 tokens)
FINETUNE_BYTES = 400_000  # the fine-tuning text: 40 pieces of the training text, spread evenly over it
FINETUNE_PIECES = 40
FINETUNE = "finetune-spread.txt"
WIDTHS = (0.25, 0.5, 0.75)


def zoo_cli(*args: str) -> None:
    """A ``zoo`` command of this checkout, in its own process (as a user runs it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ZOO_CACHE_DIR": str(WORK / "cache")}
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"zoo {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")


def convert(work: Path) -> Path:
    family = work / "family.safetensors"
    if not family.exists():
        calibration = work / "calibration.txt"
        calibration.write_text((work / "train.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
        zoo_cli("convert", str(work / "pretrained"), "--order", "activation", "--calibrate", f"text:{calibration}",
                "--out", str(family))  # fmt: skip
    finetune = work / FINETUNE
    if not finetune.exists():  # every part of the training text, as the held-out text is unlike its first modules
        text, size = (work / "train.txt").read_bytes(), FINETUNE_BYTES // FINETUNE_PIECES
        starts = [text.find(b"\n", i * len(text) // FINETUNE_PIECES) + 1 for i in range(FINETUNE_PIECES)]
        pieces = [text[s : s + size] for s in starts]
        with atomic_path(finetune) as tmp:
            tmp.write_bytes(b"".join(p[: p.rfind(b"\n") + 1] for p in pieces))
    return family


def depth_member(layers: int, drop: int) -> dict:
    """Drop ``drop`` blocks before the last one (the first and last stay: the embedding's and
    the head's neighbours), as layer-pruning studies find late-middle blocks least needed."""
    return {"blocks": [*range(layers - 1 - drop), layers - 1]}


def matched_width(family, params: int) -> dict:
    """The width-reduced member (heads in key/value groups, MLP units in eights) whose
    parameter count is closest to ``params``, heads and MLP kept as equal as that allows."""
    units = next(iter(family.blocks.values())).mlp.up_proj.weight.shape[0]
    best = None
    for heads in (0.25, 0.5, 0.75, 1.0):
        for kept in range(8, units + 1, 8):
            member = {"heads": heads, "mlp": kept / units}
            gap = abs(zoo.count_params(family, member) - params) / params
            score = (round(gap, 3), abs(heads - kept / units))
            if best is None or score < best[0]:
                best = (score, member)
    return best[1]


def scored_members(family) -> dict[str, dict]:
    """Name -> member: widths, depth -2 and -4, and width members matched to each depth's size."""
    layers = len(family.blocks)
    members = {"full": {"width": 1.0}, **{f"width {w}": {"width": w} for w in WIDTHS}}
    for drop in (2, 4):
        if layers - drop >= 2:
            depth = depth_member(layers, drop)
            members[f"depth -{drop}"] = depth
            members[f"width = depth -{drop}"] = matched_width(family, zoo.count_params(family, depth))
    return members


def held_out(family, work: Path) -> FileTokenIds:
    """The held-out text's windows, through the family's tokenizer and zoo's token cache."""
    os.environ["ZOO_CACHE_DIR"] = str(work / "cache")
    cache = cached_tokens(work / "held.txt", recorded_tokenizer_files(family.zoo_metadata)["tokenizer.json"])
    return FileTokenIds(cache, 0, cache.stat().st_size // TOKEN_RECORD.itemsize, SEQ, SEQ)


def score(path: Path, members: dict[str, dict], work: Path) -> dict[str, dict]:
    model = zoo.load(path)
    chosen = [model.resolve_member(m) for m in members.values()]
    records = evaluate(model, held_out(model, work), chosen, batch_size=8, limit=EVAL_WINDOWS)
    return {
        name: {"bits_per_byte": round(r["bits_per_byte"], 4), "loss_per_token": round(r["loss"], 4)}
        for name, r in zip(members, records, strict=True)
    }


def train_run(family: Path, out: Path, plan: dict, seed: int, member_flags: list[str], strategy: str) -> Path:
    """``zoo train FAMILY``: K steps on the fine-tuning text; resumed if a checkpoint is there."""
    if (out / "model.safetensors").exists():
        return out / "model.safetensors"
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    zoo_cli("train", str(family), "--data", f"text:{WORK / FINETUNE}", "--strategy", strategy, *member_flags,
            "--steps", str(plan["K"]), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", str(plan["lr"]),
            "--optimizer", "adamw", "--warmup-steps", str(max(1, plan["K"] // 10)), "--eval-every", str(plan["K"]),
            "--ckpt-every", "10", "--seed", str(seed), "--out", str(out), *resume)  # fmt: skip
    return out / "model.safetensors"


def member_flags(member: dict) -> list[str]:
    if set(member) == {"width"}:
        return ["--width", str(member["width"])]
    return ["--member", json.dumps(member)]


def run_once(name: str, compute) -> dict:
    """One run's result, from its JSON if it finished before."""
    path = RESULTS / "runs" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.time()
    result = {"run": name, **compute(), "seconds": round(time.time() - started)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name}: {time.time() - started:.0f} s", flush=True)
    return result


def slug(name: str) -> str:
    return name.replace(" = ", "-as-").replace(" ", "").replace("-", "m").replace(".", "")


def run_all(seeds: list[int], plan: dict) -> dict:
    """Every run not finished yet, in the order that gives a complete first seed soonest."""
    family = convert(WORK)
    members = scored_members(zoo.load(family))
    runs = [run_once("a-sliced", lambda: {"scores": score(family, members, WORK)})]
    joint = [flag for w in (*WIDTHS, 1.0) for flag in ("--width", str(w))]
    joint += [flag for m in members.values() if set(m) != {"width"} for flag in ("--member", json.dumps(m))]
    for seed in seeds:
        out = WORK / "runs" / f"joint-{plan['tag']}-s{seed}"
        runs.append(run_once(f"b-joint-{plan['tag']}-s{seed}", lambda: {
            "scores": score(train_run(family, out, plan, seed, joint, "sandwich"), members, WORK)}))  # fmt: skip
        for name, member in members.items():
            out = WORK / "runs" / f"alone-{slug(name)}-{plan['tag']}-s{seed}"
            runs.append(run_once(f"c-alone-{slug(name)}-{plan['tag']}-s{seed}", lambda: {
                "scores": score(train_run(family, out, plan, seed, member_flags(member), "separate"),
                                {name: member}, WORK)}))  # fmt: skip
    return {"family": family, "members": members, "runs": runs}


def summary(done: dict, seeds: list[int], plan: dict) -> dict:
    """Per member: parameters, (a), and the scores of (b) and (c) of ``plan``, one per seed."""
    model = zoo.load(done["family"])
    table = {}
    for name, member in done["members"].items():
        row = {"member": member, "params": zoo.count_params(model, member)}
        for condition, prefix in (("a_sliced", "a-"), ("b_joint", "b-"), ("c_alone", "c-")):
            values = [r["scores"][name]["bits_per_byte"] for r in done["runs"]
                      if r["run"].startswith(prefix) and name in r["scores"]
                      and (prefix == "a-" or f"-{plan['tag']}-" in r["run"])]  # fmt: skip
            row[condition] = values
        table[name] = row
    pretrained = json.loads((WORK / "pretrain_done.json").read_text())
    return {
        "setup": {
            "seq_len": SEQ,
            "batch": BATCH,
            **plan,
            "seeds": seeds,
            "eval_windows": EVAL_WINDOWS,
            "eval_tokens": EVAL_WINDOWS * SEQ,
            "finetune": f"{FINETUNE_PIECES} pieces of {FINETUNE_BYTES // FINETUNE_PIECES} bytes spread over train.txt",
            "pretrain": pretrained,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },  # fmt: skip
        "members": table,
    }


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)})"


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"Bits per byte on {setup['eval_tokens']} held-out tokens (lower is better); K = {setup['K']} steps of "
        f"batch {setup['batch']} x {setup['seq_len']} tokens at peak lr {setup['lr']:g}; mean ± sd (seeds).",
        "",
        "| member | params | (a) sliced | (b) joint K | (c) alone K |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["members"].items():
        cells = [_cell(row[c]) for c in ("a_sliced", "b_joint", "c_alone")]
        lines.append(f"| {name} `{json.dumps(row['member'])}` | {row['params']:,} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="K: fine-tuning steps per run")
    parser.add_argument("--lr", type=float, default=2e-4, help="fine-tuning peak learning rate (AdamW, cosine)")
    args = parser.parse_args()
    plan = {"K": args.steps, "lr": args.lr, "tag": f"K{args.steps}-lr{args.lr:g}"}
    torch.set_num_threads(1)
    if not (WORK / "pretrain_done.json").exists():
        raise SystemExit(f"no finished stand-in model in {WORK}: run benchmarks/lm_pretrain.py first")
    report = summary(run_all(args.seeds, plan), args.seeds, plan)
    stem = f"evidence-{plan['tag']}"
    for name, text in ((f"{stem}.json", json.dumps(report, indent=1) + "\n"), (f"{stem}.md", markdown(report))):
        with atomic_path(RESULTS / name) as tmp:
            tmp.write_text(text)
    print(markdown(report))


if __name__ == "__main__":
    main()
