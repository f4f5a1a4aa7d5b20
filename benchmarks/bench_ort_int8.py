"""int8 forms of GPT-nano's export in onnxruntime: latency against PyTorch and bits per byte.

The byte GPT's full member of the shipped weights (``slim_gpt_nano``, 4 blocks of width 128,
256-byte context) is exported as ``zoo export`` writes it and quantized in the ways onnxruntime
offers for a Transformer's weight products; each file is timed against PyTorch at batch 1 and
8 (one thread, CPU time of the calling thread, interleaved) and evaluated on the first 64
validation windows of the recorded data:

- ``dynamic``: ``zoo export --quantize int8`` for Transformers (``export/quantize.py``: int8
  per-channel weights, activations quantized per batch at run time);
- ``dynamic per-tensor``: the same with one scale per weight matrix;
- ``static-matmul``: ``export/quantize.py``'s calibrated QDQ of the weight products (7-bit
  weights), calibrated on 256 examples of the recorded training data;
- ``static-matmul QOperator``: the same calibration written as QLinearMatMul nodes (8-bit
  weights), int8 or uint8 activations;
- ``MatMulNBits 8-bit`` / ``4-bit``: onnxruntime's weight-only block quantization (blocks of
  32, symmetric) with ``accuracy_level=4`` (int8 products of blockwise-quantized activations).

    python benchmarks/bench_ort_int8.py [--repeats 30]

Prints a table and writes it to benchmarks/results/ort_int8.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from bench_ort_floor import WARMUP, WEIGHTS, ort_runner, recorded_data
from machine import describe  # benchmarks/machine.py: the CPU for the results file
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.benchmark import time_interleaved
from export.latency import latency_clock
from export.onnx_export import export_member
from export.quantize import _ArrayReader, evaluate, quantize_int8
from zoo import WeightsSource
from zoo.fileio import atomic_path

RESULTS = Path(__file__).parent / "results" / "ort_int8.md"
NAME, BATCHES, GOAL = "slim_gpt_nano", (1, 8), 0.5


def variants(fp32: Path, work: Path, calibration) -> dict[str, Path]:
    """Every int8 file of ``fp32``, by name."""
    prepared = work / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    files = {"float32": fp32}

    def path(name: str) -> Path:
        files[name] = work / f"{len(files)}.onnx"
        return files[name]

    quantize_int8(fp32, path("dynamic"), "dynamic")
    quantize_dynamic(prepared, path("dynamic per-tensor"), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    quantize_int8(fp32, path("static-matmul"), "static-matmul", calibration)
    for activations in (QuantType.QInt8, QuantType.QUInt8):
        quantize_static(
            prepared,
            path(f"static-matmul QOperator, {'u' if activations == QuantType.QUInt8 else ''}int8 activations"),
            _ArrayReader(calibration),
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            activation_type=activations,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["MatMul"],
        )
    for bits in (8, 4):
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(prepared)), bits=bits, block_size=32, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        onnx.save(quantizer.model.model, str(path(f"MatMulNBits {bits}-bit")))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs of each file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ort.set_default_logger_severity(3)  # the cache defaults: a warning per session and input
    load_before, started = os.getloadavg()[0], time.time()
    source = WeightsSource.open(WEIGHTS / f"{NAME}.safetensors")
    sliced = source.member(source.model.members[-1])
    with tempfile.TemporaryDirectory(prefix="zoo-ort-int8-") as folder:
        work = Path(folder)
        export_member(sliced, work / "model.onnx")
        model = sliced.model.eval()
        calibration, validation = recorded_data(model)
        files = variants(work / "model.onnx", work, calibration)
        bits = {name: evaluate(path, validation, "tokens")["bits_per_byte"] for name, path in files.items()}
        timings = {}
        for batch in BATCHES:
            example = model.example_input(batch)
            feeds = {"input": example.numpy()}
            runs = {"PyTorch": lambda x=example: model(x), **{n: ort_runner(p, feeds) for n, p in files.items()}}
            with torch.inference_mode():
                timings[batch] = time_interleaved(runs, args.repeats, warmup=WARMUP, clock=latency_clock(1))
            print(batch, {k: round(v, 2) for k, v in timings[batch].items()}, flush=True)
    lines = [
        "# int8 forms of GPT-nano's export in onnxruntime",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/bench_ort_int8.py --repeats {args.repeats}` "
        f"in {time.time() - started:.0f} s. Machine: {describe()}, 1-minute load average {load_before:.1f} before "
        f"and {os.getloadavg()[0]:.1f} after; onnxruntime {ort.__version__}, torch {torch.__version__}, one thread. "
        f"Median CPU time of the calling thread over {args.repeats} interleaved runs; bits per byte on the first 64 "
        "validation windows of 256 bytes of the recorded data. Goal: int8 at <= 0.5x PyTorch, bits per byte "
        "within 0.05 of float32.",
        "",
        "| file | bits per byte (change) | "
        + " | ".join(f"batch {b} ms | batch {b} / PyTorch" for b in BATCHES)
        + " |",
        "|---|---|" + "---|---|" * len(BATCHES),
    ]
    for name in ["PyTorch", *files]:
        quality = "" if name == "PyTorch" else f"{bits[name]:.4f} ({bits[name] - bits['float32']:+.4f})"
        cells = [f"{timings[b][name]:.2f} | {timings[b][name] / timings[b]['PyTorch']:.2f}x" for b in BATCHES]
        lines.append(f"| {name} | {quality} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
