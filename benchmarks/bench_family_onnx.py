"""One ONNX file for a whole family against one file per member: size, latency, memory.

For each model, a family of uniform widths (random weights with perturbed batch-norm statistics:
speed and size do not depend on the values) is exported both ways: ``export_family`` (one file,
weights stored once) and ``export_member`` per member. Reported:

- sizes: the family file, the full member's own file, the sum of the per-member files;
- latency at batch 1 of each member run from the family file (``Predictor(member=...)``, which
  hands onnxruntime the member's branch of the graph alone; and plain onnxruntime on the whole
  file, fed ``member``) against its own file, timed interleaved (medians); the largest
  |difference| of their outputs;
- memory: the resident set an onnxruntime session adds (after one run) in a fresh process per
  session: a member from the family file (Predictor, and plain onnxruntime), against the full
  member's own file and the member's own file.

Targets (issue 26): family file <= 1.1x the full member's file; each member's latency <= 1.1x its
own file's; outputs equal (<= 1e-5); memory of a member's session <= 1.3x one on the full member's
file.

    python benchmarks/bench_family_onnx.py [--models slim_resnet50,slim_mobilenetv2,slim_vit_small]
        [--image-size 224] [--threads 1] [--repeats 20]

Prints the tables and writes them to benchmarks/results/family_onnx.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import describe  # benchmarks/machine.py: the CPU for the results file

import zoo
from export.benchmark import time_interleaved
from export.family_export import export_family
from export.onnx_export import export_member
from export.runtime import Predictor
from zoo.fileio import atomic_path

WIDTHS = (0.25, 0.5, 0.75, 1.0)
RESULTS = Path(__file__).parent / "results" / "family_onnx.md"
ROOT = Path(__file__).resolve().parent.parent
SIZE_TARGET, LATENCY_TARGET, MEMORY_TARGET, EQUALITY = 1.1, 1.1, 1.3, 1e-5

# What one session adds to a process's resident set: read after imports, then after the session
# ran once; printed as JSON (kilobytes). Run in a fresh process per session.
MEMORY_PROBE = """
import json, sys, numpy as np, onnxruntime as ort
from export.runtime import Predictor
def rss():
    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return int(fields['VmRSS'].split()[0]), int(fields['VmHWM'].split()[0])
kind, path, member, shape, threads = json.loads(sys.argv[1])
x = np.zeros([1, *shape], dtype=np.float32)
before = rss()[0]
if kind == 'plain':
    options = ort.SessionOptions(); options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    session.run(['logits'], {'input': x, 'member': np.array(member)})
else:
    Predictor(path, threads=threads, member=member).run(x)
after, peak = rss()
print(json.dumps({'session_kb': after - before, 'peak_kb': peak - before}))
"""


def build_family(name: str, image_size: int, folder: Path) -> zoo.WeightsSource:
    torch.manual_seed(0)
    model = zoo.create_model(name, widths=list(WIDTHS), img_size=image_size).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            if "running_var" in buffer_name:
                buffer.uniform_(0.5, 2.0, generator=generator)
            elif "running_mean" in buffer_name:
                buffer.normal_(0.0, 0.1, generator=generator)
    return zoo.WeightsSource.open(zoo.save(model, folder / f"{name}.safetensors"))


def session_memory(kind: str, path: Path, member: str | int | None, shape: list[int], threads: int) -> dict:
    """The resident set (MB) a session adds in a fresh process, and its peak while starting."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, json.dumps([kind, str(path), member, shape, threads])],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    numbers = json.loads(probe.stdout.strip().splitlines()[-1])
    return {"session_mb": numbers["session_kb"] / 1024, "peak_mb": numbers["peak_kb"] / 1024}


def measure(name: str, image_size: int, threads: int, repeats: int, folder: Path) -> dict:
    source = build_family(name, image_size, folder)
    family = export_family(source, folder / "family.onnx")
    members = {m.key: export_member(source.member(m), folder / f"{m.key}.onnx") for m in source.model.members}
    largest = source.model.largest.key
    shape = list(source.model.pretrained_cfg["input_size"])
    x = np.random.default_rng(0).standard_normal([1, *shape]).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    plain = ort.InferenceSession(str(family.path), options, providers=["CPUExecutionProvider"])
    runs, rows = {}, []
    for entry in family.members:
        key, choice = entry["key"], {"member": np.array(entry["index"])}
        own, chosen = Predictor(members[key].path, threads=threads), Predictor(family.path, threads=threads, member=key)
        runs[(key, "own")] = lambda p=own: p.run(x)
        runs[(key, "family")] = lambda p=chosen: p.run(x)
        runs[(key, "plain")] = lambda c=choice: plain.run(["logits"], {"input": x, **c})
        difference = float(np.abs(own.run(x) - chosen.run(x)).max())
        plain_difference = float(np.abs(own.run(x) - runs[(key, "plain")]()[0]).max())
        rows.append(
            {
                "member": key,
                "index": entry["index"],
                "params": entry["num_params"],
                "flops": entry["flops"],
                "max_abs_diff": max(difference, plain_difference),
            }
        )
    latency = time_interleaved(runs, repeats)
    for row in rows:
        key = row["member"]
        row["latency_ms"] = {kind: latency[(key, kind)] for kind in ("own", "family", "plain")}
        row["memory_mb"] = {
            "own": session_memory("own", members[key].path, None, shape, threads),
            "family": session_memory("family", family.path, key, shape, threads),
            "plain": session_memory("plain", family.path, row["index"], shape, threads),
        }
    return {
        "model": name,
        "image_size": image_size,
        "family_bytes": family.size_bytes,
        "full_member_bytes": members[largest].size_bytes,
        "sum_member_bytes": sum(r.size_bytes for r in members.values()),
        "full_member_memory_mb": next(r for r in rows if r["member"] == largest)["memory_mb"]["own"]["session_mb"],
        "members": rows,
    }


def table(result: dict) -> list[str]:
    full_memory = result["full_member_memory_mb"]
    size_ratio = result["family_bytes"] / result["full_member_bytes"]
    lines = [
        f"### {result['model']} ({result['image_size']} px, widths {', '.join(map(str, WIDTHS))})",
        "",
        f"File sizes: family {result['family_bytes'] / 1e6:.2f} MB, full member's own file "
        f"{result['full_member_bytes'] / 1e6:.2f} MB (**{size_ratio:.3f}x**, target <= {SIZE_TARGET}x), "
        f"sum of the per-member files {result['sum_member_bytes'] / 1e6:.2f} MB.",
        "",
        "| member | params | MFLOPs | own file ms | family ms (Predictor) | ratio | family ms (plain ort) | ratio "
        "| max abs diff | session MB own | family (Predictor) | family (plain ort) | Predictor / full own |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["members"]:
        ms, memory = row["latency_ms"], row["memory_mb"]
        lines.append(
            f"| {row['member']} | {row['params']:,} | {row['flops'] / 1e6:,.1f} | {ms['own']:.3f} | {ms['family']:.3f} "
            f"| {ms['family'] / ms['own']:.2f}x | {ms['plain']:.3f} | {ms['plain'] / ms['own']:.2f}x "
            f"| {row['max_abs_diff']:.1e} | {memory['own']['session_mb']:.1f} | {memory['family']['session_mb']:.1f} "
            f"| {memory['plain']['session_mb']:.1f} | {memory['family']['session_mb'] / full_memory:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="slim_resnet50,slim_mobilenetv2,slim_vit_small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-family-") as folder:
            results.append(measure(name, args.image_size, args.threads, args.repeats, Path(folder)))
            print("\n".join(table(results[-1])), flush=True)
    lines = [
        "# One ONNX file for the family (benchmarks/bench_family_onnx.py)",
        "",
        f"{describe()}; onnxruntime {ort.__version__}, {args.threads} thread(s), batch 1, median of "
        f"{args.repeats} interleaved runs. Memory: what one session adds to a fresh process's resident set "
        "after one run (MB).",
        "",
    ]
    for result in results:
        lines += table(result) + [""]
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
