"""zoo's Transformer exports against onnxruntime's floor for the same shapes, and against PyTorch.

For ViT-Tiny (``slim_vit_tiny``, the pretrained digits model: 8x8 images, 2x2 patches, 17 tokens,
12 blocks of width 192) and GPT-nano (``slim_gpt_nano``, the byte GPT's smallest catalogue
variant: 4 blocks of width 128, 256-byte context), full members of the shipped weights, at batch 1
and 8, one thread, timed interleaved:

- **export**: ``export_member``'s file, as ``zoo export`` writes it (and with ``--fuse``);
- **floor**: one onnxruntime graph of only the model's matrix products and attention, at the
  shapes a PyTorch forward pass records (each ``Linear`` as ``MatMul``, the patch embedding as
  the ``MatMul`` it is, each attention as ONNX's ``Attention`` kernel, causal for the GPT);
- **PyTorch**: the same sliced model in eager mode;
- **int8**: the export statically quantized (``export/quantize.py``, calibrated on the family's
  recorded data), with its accuracy / bits per byte against float32 on the recorded validation data;
- **int8 floor**: the floor graph through the same dynamic int8 as the export (int8 weight products,
  float attention): what an int8 file needs at least.

On a loaded machine wall time mostly measures waiting for a core, so everything runs on one
thread and is timed by that thread's CPU time (``export.latency.latency_clock``). ``--profile``
adds onnxruntime's per-operator times of each export (``SessionOptions.enable_profiling``).

    python benchmarks/bench_ort_floor.py [--repeats 30] [--profile]

Prints tables and writes them to benchmarks/results/ort_floor.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import describe  # benchmarks/machine.py: the CPU for the results file
from onnx import TensorProto, helper, numpy_helper, save_model

from export.benchmark import onnx_session, time_interleaved
from export.latency import latency_clock
from export.onnx_export import export_member
from export.quantize import evaluate, quantize_int8
from training.model_data import data_for
from zoo import WeightsSource
from zoo.fileio import atomic_path
from zoo.models.transformer import Attention

RESULTS = Path(__file__).parent / "results" / "ort_floor.md"
WEIGHTS = Path(__file__).parents[1] / "weights"
FAMILIES = {"ViT-Tiny": "slim_vit_tiny", "GPT-nano": "slim_gpt_nano"}
BATCHES = (1, 8)
GOAL_FLOOR, GOAL_INT8 = 1.15, 0.5
WARMUP = 3
PRODUCTS = ("MatMul", "FusedMatMul", "Gemm")  # onnxruntime's names after its graph optimisation
INT8 = ("static", "static-matmul", "dynamic")  # export/quantize.py's methods
CALIBRATION_BATCHES, CALIBRATION_SIZE = 8, 32  # as zoo export --quantize int8 (cli/export_commands.py)
VALIDATION = {"image": (64, 3), "tokens": (16, 4)}  # batch size, batches: all 179 digits; 64 windows


def products(model: torch.nn.Module, example: torch.Tensor) -> list[tuple]:
    """The matrix products and attentions of one forward pass, in order, with their shapes:
    ``("matmul", rows, inputs, outputs)`` or ``("attention", batch, heads, tokens, head_dim, causal)``."""
    found, hooks = [], []

    def linear(module, args, out):
        x = args[0]
        found.append(("matmul", x.numel() // x.shape[-1], x.shape[-1], out.shape[-1]))

    def conv(module, args, out):  # a patch embedding: kernel == stride, so one product per patch
        x = args[0]
        patch = x.shape[-1] // out.shape[-1]
        found.append(("matmul", out.numel() // out.shape[1], x.shape[1] * patch * patch, out.shape[1]))

    def attention(module, args, out):
        x = args[0]
        found.append(("attention", x.shape[0], module.num_heads, x.shape[1], module.head_dim, module.causal))

    for module in model.modules():
        kind = type(module).__name__
        if isinstance(module, Attention):
            hooks.append(module.register_forward_hook(attention))
        elif kind.endswith("Linear") and not list(module.children()):
            hooks.append(module.register_forward_hook(linear))
        elif kind.endswith("Conv2d") and not list(module.children()):
            hooks.append(module.register_forward_hook(conv))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def floor_graph(ops: list[tuple], rng: np.random.Generator) -> tuple[object, dict[str, np.ndarray]]:
    """One ONNX graph of independent ``MatMul`` and ``Attention`` nodes (weights as initializers),
    and its feeds: what onnxruntime needs at least to run the model's products."""
    nodes, inputs, weights, outputs, feeds = [], [], [], [], {}

    def feed(name: str, shape: tuple) -> None:
        feeds[name] = rng.standard_normal(shape, dtype=np.float32)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    for i, op in enumerate(ops):
        out = f"y{i}"
        if op[0] == "matmul":
            _, rows, n_in, n_out = op
            feed(f"x{i}", (rows, n_in))
            weights.append(numpy_helper.from_array(rng.standard_normal((n_in, n_out), dtype=np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [out]))
        else:
            _, batch, heads, tokens, head_dim, causal = op
            for part in "qkv":
                feed(f"{part}{i}", (batch, heads, tokens, head_dim))
            nodes.append(helper.make_node("Attention", [f"q{i}", f"k{i}", f"v{i}"], [out], is_causal=int(causal)))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "floor", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model, feeds


def ort_runner(path: Path, feeds: dict[str, np.ndarray]):
    session = onnx_session(path, threads=1)
    return lambda: session.run(None, feeds)


def recorded_data(model) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Calibration inputs (training split) and validation (inputs, targets), from the data the
    weights file records, sized as ``zoo export --quantize int8`` sizes them."""
    from training.data import batches

    bundle = data_for(model, "calibrate")
    calibration = [b.numpy() for b in batches(bundle.train, CALIBRATION_SIZE, limit=CALIBRATION_BATCHES)]
    size, count = VALIDATION[model.input_kind]
    count = min(len(bundle.val), size * count)
    validation = []
    for start in range(0, count, size):
        inputs, targets = zip(*(bundle.val[i] for i in range(start, min(start + size, count))))
        validation.append((torch.stack(inputs).numpy(), torch.stack(targets).numpy()))
    return calibration, validation


def prepare(name: str, work: Path, rng) -> dict:
    """Export, fuse, quantize and build the floor of one family's full member; the runs to time."""
    source = WeightsSource.open(WEIGHTS / f"{name}.safetensors")
    sliced = source.member(source.model.members[-1])
    export_member(sliced, work / f"{name}.onnx")  # merges low-rank layers of sliced.model in place
    export_member(sliced, work / f"{name}.fused.onnx", fuse=True)
    model = sliced.model.eval()
    calibration, validation = recorded_data(model)
    quality = {"float32": evaluate(work / f"{name}.onnx", validation, model.input_kind)}
    for method in INT8:
        quantize_int8(work / f"{name}.onnx", work / f"{name}.{method}.onnx", method, calibration)
        quality[method] = evaluate(work / f"{name}.{method}.onnx", validation, model.input_kind)
    runs = {}
    for batch in BATCHES:
        example = model.example_input(batch)
        floor, floor_feeds = floor_graph(products(model, example), rng)
        save_model(floor, str(work / f"{name}.floor{batch}.onnx"))
        quantize_int8(work / f"{name}.floor{batch}.onnx", work / f"{name}.floor{batch}.int8.onnx", "dynamic")
        feeds = {"input": example.numpy()}
        runs[batch] = {
            "export": ort_runner(work / f"{name}.onnx", feeds),
            "export --fuse": ort_runner(work / f"{name}.fused.onnx", feeds),
            "floor": ort_runner(work / f"{name}.floor{batch}.onnx", floor_feeds),
            "PyTorch": lambda m=model, x=example: m(x),
            **{f"int8 {method}": ort_runner(work / f"{name}.{method}.onnx", feeds) for method in INT8},
            "int8 floor": ort_runner(work / f"{name}.floor{batch}.int8.onnx", floor_feeds),
        }
    return {"runs": runs, "quality": quality, "model": model}


def profile(path: Path, feeds: dict[str, np.ndarray], runs: int, work: Path) -> dict[str, float]:
    """Milliseconds per run by operator type (the sum of its nodes' median times), from
    onnxruntime's profiler (one thread, full graph optimisation, as timed); matrix products
    split into weight products and the products of attention (scores, probabilities times values)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling, options.profile_file_prefix = True, str(work / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(WARMUP + runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    timed = starts[WARMUP]  # the warm-up runs pay for first allocations
    per_node: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed:
            op, args = event["args"]["op_name"], event["args"]
            if op in PRODUCTS:  # prepacked weights are no longer listed among a node's inputs
                weights = int(args.get("parameter_size", 0)) or len(args.get("input_type_shape", [])) < 2
                op += " (weights)" if weights else " (activations)"
            per_node[op, event["name"]].append(event["dur"] / 1000)
    per_op: dict[str, float] = defaultdict(float)
    for (op, _), durations in per_node.items():  # each node's median: a run preempted by the load drops out
        per_op[op] += statistics.median(durations)
    return dict(sorted(per_op.items(), key=lambda item: -item[1]))


def latency_table(timings: dict[tuple[str, int], dict[str, float]]) -> list[str]:
    """Milliseconds of each variant, then the ratios the goals are about."""
    names = list(next(iter(timings.values())))
    lines = [
        "| model | batch | " + " | ".join(f"{name} ms" for name in names) + " | export / floor | --fuse / floor "
        "| export / PyTorch | " + " | ".join(f"{m} / PyTorch" for m in (*INT8, "int8 floor")) + " |",
        "|---|---|" + "---|" * (len(names) + 4 + len(INT8)),
    ]
    for (family, batch), ms in timings.items():
        floor, pt = ms["floor"], ms["PyTorch"]
        cells = [f"{ms[name]:.2f}" for name in names] + [
            f"{ms['export'] / floor:.2f}x",
            f"{ms['export --fuse'] / floor:.2f}x",
            f"{ms['export'] / pt:.2f}x",
            *(f"{ms[f'int8 {m}'] / pt:.2f}x" for m in (*INT8, "floor")),
        ]
        lines.append(f"| {family} | {batch} | " + " | ".join(cells) + " |")
    return lines


def quality_table(qualities: dict[str, dict]) -> list[str]:
    """Accuracy or bits per byte of float32 and each int8 file on the same validation data."""
    lines = ["| model | metric | float32 | " + " | ".join(f"int8 {m} (change)" for m in INT8) + " |"]
    lines.append("|---|---|---|" + "---|" * len(INT8))
    for family, quality in qualities.items():
        fp32 = quality["float32"]
        metric = "accuracy" if "accuracy" in fp32 else "bits_per_byte"
        cells = [f"{quality[m][metric]:.4f} ({quality[m][metric] - fp32[metric]:+.4f})" for m in INT8]
        lines.append(f"| {family} | {metric} | {fp32[metric]:.4f} | " + " | ".join(cells) + " |")
    return lines


def profile_table(profiles: dict[tuple[str, int, str], dict[str, float]]) -> list[str]:
    lines = ["| model | batch | file | total ms | per operator type: ms (share) |", "|---|---|---|---|---|"]
    for (family, batch, kind), per_op in profiles.items():
        total = sum(per_op.values())
        ops = ", ".join(f"{op} {ms:.2f} ({ms / total:.0%})" for op, ms in per_op.items() if ms / total >= 0.01)
        lines.append(f"| {family} | {batch} | {kind} | {total:.2f} | {ops} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs of each variant")
    parser.add_argument("--profile", action="store_true", help="also onnxruntime's per-operator times")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ort.set_default_logger_severity(3)  # the GPT's cache defaults: a warning per session and input
    rng = np.random.default_rng(0)
    load_before, started = os.getloadavg()[0], time.time()
    timings, qualities, profiles = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="zoo-ort-floor-") as folder:
        work = Path(folder)
        for family, name in FAMILIES.items():
            prepared = prepare(name, work, rng)
            qualities[family] = prepared["quality"]
            for batch, runs in prepared["runs"].items():
                with torch.inference_mode():
                    timings[family, batch] = time_interleaved(runs, args.repeats, warmup=WARMUP, clock=latency_clock(1))
                print(family, batch, {k: round(v, 2) for k, v in timings[family, batch].items()}, flush=True)
                if args.profile:
                    example = prepared["model"].example_input(batch).numpy()
                    for kind, path in (("float32", f"{name}.onnx"), ("int8 dynamic", f"{name}.dynamic.onnx")):
                        profiles[family, batch, kind] = profile(work / path, {"input": example}, args.repeats, work)
    lines = [
        "# zoo's Transformer exports against onnxruntime's floor",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/bench_ort_floor.py --repeats {args.repeats}"
        f"{' --profile' if args.profile else ''}` in {time.time() - started:.0f} s. Machine: {describe()}, "
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after; "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, one thread. Median CPU time of the calling "
        f"thread over {args.repeats} interleaved runs (the load makes wall time mostly waiting). Full members of "
        "the shipped weights: ViT-Tiny on 8x8 digits (17 tokens), GPT-nano on 256 bytes. The floor is one graph "
        "of only the model's MatMuls and ONNX Attention kernels at the same shapes.",
        "",
        *latency_table(timings),
        "",
        "int8 files (export/quantize.py: `static` quantizes every op, `static-matmul` only the weight products, "
        "both QDQ with MinMax calibration on 256 examples of the recorded training data; `dynamic` is zoo "
        "export's default for Transformers, as is the `int8 floor`, the floor graph's weight products in dynamic "
        "int8) against float32 in onnxruntime, on the recorded validation data "
        "(all 179 digits; the first 64 windows of 256 bytes):",
        "",
        *quality_table(qualities),
    ]
    if profiles:
        lines += ["", "onnxruntime's profile of each export (kernel time per run by operator type):", ""]
        lines += profile_table(profiles)
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
