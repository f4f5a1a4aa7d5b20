"""How much of timm becomes a zoo family: one model per timm model module, three checks each.

For every module of ``timm/models/*.py`` that registers models, its smallest model (fewest
parameters, counted on the meta device at 10 classes) is taken at a small input (64 px, or its
own input size where it does not convert at 64 px) with random weights, and checked end to end:

1. ``zoo.from_timm`` converts it (a hand-written family, else the graph family) with widths 0.5
   and 1; the full member equals timm's model (max abs difference <= 1e-4, checked by
   ``from_timm``);
2. the width-0.5 member trains one SGD step (gradient norm clipped to 1: an unclipped step on
   random weights took dla46x_c's logits from 7 to 1e8, past what a float32 check can compare)
   with a masked optimizer step (nothing outside the member moves) and then, in evaluation,
   equals its sliced standalone model (<= 1e-4);
3. the sliced member saved, loaded by ``zoo.load`` and exported to ONNX, verified against
   PyTorch by ``zoo export``'s own check.

A model passes (``ok``) when all three do; otherwise ``refused`` with the first failure's
one-line reason. Each model runs in its own process (a hang or a crash costs that model only; at
most 900 s of CPU time each, so that the load of a shared machine does not decide)
and every record is written to ``benchmarks/results/timm_coverage.json`` as it finishes, so an
interrupted run resumes where it stopped:

    nice -n 19 python benchmarks/timm_coverage.py            # every module (resumes)
    python benchmarks/timm_coverage.py --only resnet,convnext  # some modules
    python benchmarks/timm_coverage.py --only beit --redo     # one module again, beside a full run
    python benchmarks/timm_coverage.py --table               # the README table (also timm_coverage.md)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "timm_coverage.json"
MODELS = ROOT / "benchmarks" / "results" / "timm_coverage_models.json"
SIZES, CLASSES, TIMEOUT = (64, 96, 128), 10, 900


def smallest(module: str) -> str | None:
    """The classifier of a timm module with the fewest parameters (models that fail to build,
    and encoders without ``get_classifier``, are skipped); chosen once, kept in ``MODELS``."""
    chosen = json.loads(MODELS.read_text()) if MODELS.exists() else {}
    if module in chosen:
        return chosen[module]
    import timm
    import torch

    best = None
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, num_classes=CLASSES)
        except Exception:  # a model that does not build at these arguments is not the representative
            continue
        if not hasattr(model, "get_classifier"):  # an encoder (gemma4_vit's *_enc): no logits to train
            continue
        count = sum(p.numel() for p in model.parameters())
        if best is None or count < best[0]:
            best = (count, name)
    chosen[module] = best[1] if best else None
    MODELS.parent.mkdir(parents=True, exist_ok=True)
    tmp = MODELS.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(chosen, indent=1, sort_keys=True) + "\n")
    tmp.replace(MODELS)
    return chosen[module]


def _convert(name: str, cfg) -> tuple:
    """The family at 64 px; a model that does not convert there (a ViT whose patch size does not
    divide 64, a window size, a fixed position embedding) tries 96 and 128 px, then its own size."""
    import torch

    import zoo

    def at(size: int) -> tuple:
        batches = [torch.randn(4, 3, size, size) for _ in range(2)]
        return zoo.from_timm(name, num_classes=CLASSES, img_size=size, widths=[0.5], calibration=batches), batches

    own = cfg.input_size[-1]
    for size in [s for s in SIZES if s < own]:
        try:
            return at(size)
        except Exception:  # the next size
            pass
    return at(own)


def check(name: str) -> dict:
    """The three checks on one model (run in a child process); the record's status and reason."""
    import timm
    import torch

    import zoo
    from export.onnx_export import export_file
    from training.masking import MaskCache, masked_step

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = timm.models.get_pretrained_cfg(name)
    stage = "convert"
    try:
        family, batches = _convert(name, cfg)
        stage = "train"
        family.train().set_member(width=0.5, for_training=True)
        optimizer = torch.optim.SGD(family.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        loss = torch.nn.functional.cross_entropy(family(batches[0]), torch.randint(CLASSES, (4,)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(family.parameters(), 1.0)  # random weights: a step must not blow it up
        masked_step(optimizer, MaskCache(family).union([family.active_member]))
        family.eval().set_member(width=0.5)
        sliced = zoo.slice(family, width=0.5)
        difference = (sliced(batches[1]) - family(batches[1])).abs().max().item()
        if not difference <= 1e-4:
            raise ValueError(f"the trained member differs from its slice by {difference:.3g}")
        stage = "export"
        with tempfile.TemporaryDirectory() as folder:
            path = zoo.save(family, Path(folder) / "family.safetensors")
            export_file(path, Path(folder) / "member.onnx", width=0.5)
    except Exception as err:  # every failure is a record: its stage and first line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return {"status": "refused", "stage": stage, "reason": f"{type(err).__name__}: {reason}"}
    converted = family.zoo_metadata["converted_from"]
    size = family.pretrained_cfg["input_size"][-1]
    return {
        "status": "ok",
        "family": converted["family"],
        "img_size": size,
        "max_abs_diff": converted["max_abs_diff"],
        "reason": "",
    }


def _load() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def _record(record: dict) -> None:
    """Put one module's record into the results file (replacing an earlier one), re-read under a
    lock so that two runs (``--redo`` beside the full run) keep each other's records."""
    import fcntl

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = [r for r in _load() if r["module"] != record["module"]] + [record]
        tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(records, key=lambda r: r["module"]), indent=1) + "\n")
        tmp.replace(RESULTS)


def timm_modules() -> list[str]:
    """timm's own model modules (``timm/models/*.py`` that register models), not those a caller
    registered models from (the tests do)."""
    import timm

    return [m for m in timm.list_modules() if importlib.util.find_spec(f"timm.models.{m}") is not None]


def run(only: set[str] | None, redo: bool = False) -> None:
    """Check each module not yet recorded (with ``redo``, the ``only`` modules again); each
    record names the commit it was measured on."""
    commit = _commit()
    for module in timm_modules():
        if (only and module not in only) or (module in {r["module"] for r in _load()} and not redo):
            continue
        name = smallest(module)
        if name is None:
            continue
        start = time.time()
        command = [sys.executable, __file__, "--check", name]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=4 * TIMEOUT, env=env, cwd=ROOT)
            lines = out.stdout.strip().splitlines()
            record = (
                json.loads(lines[-1])
                if out.returncode == 0 and lines
                else _over_time(f"{TIMEOUT} s of CPU time")
                if out.returncode in (-signal.SIGXCPU, -signal.SIGKILL)  # the soft CPU limit, or the hard one
                else {
                    "status": "refused",
                    "stage": "crash",
                    "reason": (out.stderr.strip().splitlines() or ["no output"])[-1][:300],
                }
            )
        except subprocess.TimeoutExpired:  # a hang: the CPU limit did not end it
            record = _over_time(f"{4 * TIMEOUT} s")
        _record({"module": module, "model": name, **record, "seconds": round(time.time() - start, 1), "commit": commit})
        print(f"{module:<24}{name:<40}{record['status']:<9}{record['reason'][:90]}", flush=True)


def _commit() -> str:
    """This checkout's commit (``+`` where its zoo, export or training code differs from it)."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "zoo", "export", "training"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+" if dirty else "")


def _over_time(limit: str) -> dict:
    return {"status": "refused", "stage": "timeout", "reason": f"took over {limit}"}


def table(total: int | None = None) -> str:
    """The README's table: the count (of ``total`` modules, timm's own count by default), the
    refusals per stage, one row per module."""
    if total is None:
        total = len(timm_modules())
    records = _load()
    ok = sum(r["status"] == "ok" for r in records)
    stages = {}
    for r in records:
        if r["status"] != "ok":
            stages[r["stage"]] = stages.get(r["stage"], 0) + 1
    refused = ", ".join(f"{stage} {n}" for stage, n in sorted(stages.items(), key=lambda kv: (-kv[1], kv[0])))
    lines = [
        f"{len(records)} of the {total} timm modules that register models measured; {ok} of the {len(records)} "
        f"pass all three stages ({100 * ok / max(len(records), 1):.0f}%).",
        "",
        f"Refused, by the stage that failed: {refused or 'none'}.",
        "",
        "| module | model | status | reason |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['module']} | {r['model']} | {r['status']} | {_cell(r)} |" for r in records]
    return "\n".join(lines)


def _cell(record: dict) -> str:
    """A record's reason for a table cell: its stage, without colour codes or the list of what
    zoo converts (the same on every row), at most 160 characters."""
    reason = re.sub(r"\x1b\[[0-9;]*m|\[[0-9;]*m", "", record["reason"]).replace("|", "/")
    reason = reason.split(" (zoo converts ")[0]
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return f"{record['stage']}: {reason}" if reason else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated timm modules")
    parser.add_argument("--redo", action="store_true", help="check the --only modules again (replacing their records)")
    parser.add_argument("--check", help=argparse.SUPPRESS)  # one model, in the child process
    parser.add_argument("--table", action="store_true", help="print the README table from the results")
    args = parser.parse_args()
    if args.check:
        import resource

        # CPU time, not wall time: on a shared machine the wall clock mostly measures the load
        resource.setrlimit(resource.RLIMIT_CPU, (TIMEOUT, TIMEOUT + 10))
        print(json.dumps(check(args.check)))
    elif args.table:
        text = table()
        RESULTS.with_suffix(".md").write_text(text + "\n")
        print(text)
    else:
        if args.redo and not args.only:
            parser.error("--redo needs --only (the modules to check again)")
        run(set(args.only.split(",")) if args.only else None, redo=args.redo)


if __name__ == "__main__":
    main()
