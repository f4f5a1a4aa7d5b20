"""Byte generation in onnxruntime with and without the key/value cache.

A byte GPT (random weights: speed does not depend on them) is exported with zoo's exporter,
and `Predictor.generate_bytes` continues the same prompt with the cache and without it
(``use_cache=False`` recomputes the whole window for every byte, as before the cache), the two
interleaved, run by run, on one onnxruntime thread. Prompt and output fit in the context, so
every cached byte computes one new position. The cost of one position is measured as well:
the same file run on a single byte with an empty cache; a cached byte costs more than that
because it also attends to, and copies, the cache of up to ``context`` positions.

    python benchmarks/bench_generate.py [--model slim_gpt_nano] [--new-bytes 200] [--repeats 5]

Prints a table and writes it to benchmarks/results/generate.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import describe  # benchmarks/machine.py: the CPU for the results file

import zoo
from export.onnx_export import export_member
from export.runtime import Predictor
from zoo.fileio import atomic_path

RESULTS = Path(__file__).parent / "results" / "generate.md"
PROMPT = b"def main(argv=None):\n    parser = "  # 34 bytes of Python, as the shipped model reads


def seconds(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="slim_gpt_nano")
    parser.add_argument("--new-bytes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved generations per mode (median reported)")
    parser.add_argument("--fuse", action="store_true", help="export with onnxruntime's fused kernels")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_before, started = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as workdir:
        weights = zoo.save(zoo.create_model(args.model).eval(), Path(workdir) / "family.safetensors")
        exported = export_member(zoo.WeightsSource.open(weights).member(), Path(workdir) / "gpt.onnx", fuse=args.fuse)
        predictor = Predictor(exported.path, threads=1)
        context = predictor.metadata["input"]["context_length"]
        if len(PROMPT) + args.new_bytes > context:
            parser.error(f"prompt ({len(PROMPT)} bytes) and --new-bytes must fit in the context ({context})")
        modes = {"uncached": False, "cached": True}
        outputs = {
            mode: predictor.generate_bytes(PROMPT, args.new_bytes, use_cache=cache) for mode, cache in modes.items()
        }  # warm-up
        if outputs["cached"] != outputs["uncached"]:
            raise SystemExit("cached and uncached generation differ")
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, cache in modes.items():
                times[mode] += seconds(lambda: predictor.generate_bytes(PROMPT, args.new_bytes, use_cache=cache), 1)
        one_byte = np.asarray([[PROMPT[0]]], dtype=np.int64)
        position_ms = 1000 * statistics.median(seconds(lambda: predictor.run(one_byte), 200))

    median = {mode: statistics.median(t) for mode, t in times.items()}
    rate = {mode: args.new_bytes / s for mode, s in median.items()}
    cached_byte_ms = 1000 * median["cached"] / args.new_bytes
    step_ratio = cached_byte_ms / position_ms
    rows = [
        [
            "uncached (recompute the window per byte)",
            f"{rate['uncached']:.0f}",
            f"{1000 * median['uncached'] / args.new_bytes:.2f}",
            "1.00x",
        ],
        [
            "cached (one new position per byte)",
            f"{rate['cached']:.0f}",
            f"{cached_byte_ms:.2f}",
            f"{rate['cached'] / rate['uncached']:.2f}x",
        ],
    ]
    notes = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/bench_generate.py --model {args.model} "
        f"--new-bytes {args.new_bytes} --repeats {args.repeats}{' --fuse' if args.fuse else ''}` "
        f"in {time.time() - started:.0f} s.",
        f"Machine: {describe()}, 1-minute load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (other processes share these cores). torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, 1 onnxruntime thread.",
        f"{args.model} (random weights, context {context}{', fused' if args.fuse else ''}): "
        f"a {len(PROMPT)}-byte prompt "
        f"continued by {args.new_bytes} bytes, greedy; median of {args.repeats} interleaved generations per mode; "
        "both modes gave the same bytes.",
        f"One position (the file run on a single byte, empty cache): {position_ms:.2f} ms. A cached byte costs "
        f"{step_ratio:.2f}x that (it also reads and copies a cache of {len(PROMPT)} "
        f"to {len(PROMPT) + args.new_bytes - 1} positions); "
        f"an uncached byte {1000 * median['uncached'] / args.new_bytes / position_ms:.1f}x.",
    ]
    header = ["mode", "bytes/s", "ms per byte", "speed vs uncached"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(["# Byte generation with and without the key/value cache", "", *notes, "", *lines, ""])
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
