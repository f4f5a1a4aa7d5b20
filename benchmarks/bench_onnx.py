"""onnxruntime against PyTorch eager, and whether a narrower member is as much faster as its FLOPs say.

For the smallest variant of each family (random weights: speed does not depend on them), the
members at width 1.0 and 0.5 are sliced, exported with zoo's exporter (verified against
PyTorch) and timed at batch 1 in both runtimes. All four runs of a model are interleaved,
repeat by repeat, with the same fixed thread count, and medians are reported.

The Transformers are also exported with ``fuse=True`` (onnxruntime's SkipLayerNormalization and
BiasGelu kernels) and quantized to int8 (dynamic, as ``zoo export --quantize int8`` does for
them), and timed in the same interleaved loop. onnxruntime's profiler gives the share of its
kernel time that matrix products (MatMul, FusedMatMul, Gemm, Conv and Attention) take; that
share times the ort/torch ratio is the lowest ratio that fusing the other ops could reach.

Targets: onnxruntime at most 0.5x PyTorch's latency for the CNNs and 0.35x for the
Transformers; the latency ratio of width 0.5 to width 1.0 in onnxruntime at most 1.3x their
FLOP ratio (the narrow member keeps its FLOP savings rather than losing them to per-op overhead).

    python benchmarks/bench_onnx.py [--threads 1] [--repeats 30] [--image-size 224]

Prints a table and writes it to benchmarks/results/onnx.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import describe  # benchmarks/machine.py: the CPU for the results file
from onnx import TensorProto, helper, numpy_helper

import zoo
from export.benchmark import onnx_session, time_interleaved
from export.onnx_export import export_member
from export.quantize import quantize_int8
from zoo.fileio import atomic_path

MODELS = ("slim_resnet20", "slim_resnet18", "slim_mobilenetv2", "slim_vit_tiny", "slim_gpt_nano")
CNN_FAMILIES = ("resnet", "mobilenetv2")
WIDTHS = (1.0, 0.5)
SPEEDUP_TARGET, TRANSFORMER_TARGET, FLOP_TRACKING_TARGET = 0.5, 0.35, 1.3
# Attention counts whole: its two products are most of it (ViT-Tiny: 30 of its ~40 MFLOPs a block at
# 224 px, the softmax the rest), and fusion cannot shrink them.
PRODUCT_KERNELS = ("MatMul", "FusedMatMul", "Gemm", "Conv", "FusedConv", "FusedGemm", "Attention")
PROFILE_RUNS = 20
OLDER_OPSET = 18  # the ViT is also timed as exported before opset 23 (attention as MatMul, Softmax, MatMul)
RESULTS = Path(__file__).parent / "results" / "onnx.md"


def build_family(name: str, image_size: int) -> zoo.ElasticModel:
    imagenet_style = name in ("slim_resnet18", "slim_mobilenetv2", "slim_vit_tiny")
    kwargs = {"img_size": image_size} if imagenet_style else {}
    return zoo.create_model(name, widths=list(WIDTHS), **kwargs).eval()


def measure(name: str, image_size: int, repeats: int, threads: int, workdir: Path) -> dict:
    """Both widths of one model, both runtimes, interleaved; medians in milliseconds."""
    torch.manual_seed(0)
    weights = zoo.save(build_family(name, image_size), workdir / f"{name}.safetensors")
    source = zoo.WeightsSource.open(weights)
    runs, flops, shape, files = {}, {}, None, {}
    transformer = zoo.family_of(name) not in CNN_FAMILIES
    for width in WIDTHS:
        member = source.member(width)
        model = member.model.eval()
        x = model.example_input(1)
        shape = tuple(x.shape)
        runs[("pytorch", width)] = lambda model=model, x=x: model(x)
        for runtime, fuse in [("onnxruntime", False), ("fused", True)][: 1 + (transformer and width == 1.0)]:
            exported = export_member(
                source.member(width) if fuse else member, workdir / f"{name}_{width}_{runtime}.onnx", fuse=fuse
            )
            flops[width] = exported.flops
            files[(runtime, width)] = exported.path
            session = onnx_session(exported.path, threads)
            runs[(runtime, width)] = lambda session=session, x=x.numpy(): session.run(["logits"], {"input": x})
        if transformer and width == 1.0:
            int8 = workdir / f"{name}_{width}_int8.onnx"
            quantize_int8(files[("onnxruntime", width)], int8, "dynamic")
            session = onnx_session(int8, threads)
            runs[("int8", width)] = lambda session=session, x=x.numpy(): session.run(["logits"], {"input": x})
        if zoo.family_of(name) == "vit" and width == 1.0:  # what opset 23's Attention op buys
            older = export_member(member, workdir / f"{name}_{width}_opset{OLDER_OPSET}.onnx", opset=OLDER_OPSET)
            session = onnx_session(older.path, threads)
            runs[("older opset", width)] = lambda session=session, x=x.numpy(): session.run(["logits"], {"input": x})
    with torch.inference_mode():
        ms = time_interleaved(runs, repeats, warmup=3)
    share = product_share(files[("onnxruntime", 1.0)], threads, x.numpy())
    return {
        "name": name,
        "family": zoo.family_of(name),
        "input": shape,
        "flops": flops,
        "ms": ms,
        "product_share": share,
    }


def product_share(path: Path, threads: int, x) -> float:
    """The fraction of onnxruntime's kernel time that its matrix-product kernels take (profiler)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(PROFILE_RUNS):
        session.run(["logits"], {"input": x})
    profile = Path(session.end_profiling())
    kernels = [
        e for e in json.loads(profile.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    ]
    profile.unlink()
    products = sum(e["dur"] for e in kernels if e["args"].get("op_name") in PRODUCT_KERNELS)
    return products / sum(e["dur"] for e in kernels)


def product_rates(threads: int, size: int = 1024, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of one float32 square matrix product in each runtime (the CPU's ceiling for both)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "product",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(b, "b")],
    )
    with tempfile.TemporaryDirectory(prefix="bench-gemm-") as folder:
        path = Path(folder) / "matmul.onnx"
        path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
        session = onnx_session(path, threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.inference_mode():
            ms = time_interleaved(
                {"onnxruntime": lambda: session.run(None, {"a": a}), "pytorch": lambda: ta @ tb}, repeats, warmup=3
            )
    return {runtime: 2 * size**3 / (t / 1000) / 1e9 for runtime, t in ms.items()}


def rows(results: list[dict]) -> list[list[str]]:
    table = []
    for r in results:
        ms, flops, share = r["ms"], r["flops"], r["product_share"]
        torch_ms = ms[("pytorch", 1.0)]
        flop_ratio = flops[0.5] / flops[1.0]
        latency_ratio = ms[("onnxruntime", 0.5)] / ms[("onnxruntime", 1.0)]
        tracking = latency_ratio / flop_ratio
        target = SPEEDUP_TARGET if r["family"] in CNN_FAMILIES else TRANSFORMER_TARGET
        ratio = ms[("onnxruntime", 1.0)] / torch_ms
        fused = ("fused", 1.0) in ms
        best = min(ratio, ms[("fused", 1.0)] / torch_ms) if fused else ratio
        table.append(
            [
                r["name"],
                "x".join(map(str, r["input"][1:])),
                f"{flops[1.0] / 1e6:.1f}",
                f"{torch_ms:.2f}",
                f"{ms[('onnxruntime', 1.0)]:.2f}",
                f"{ratio:.2f}x",
                f"{ms[('fused', 1.0)]:.2f}" if fused else "-",
                f"{ms[('fused', 1.0)] / torch_ms:.2f}x" if fused else "-",
                f"{ms[('int8', 1.0)] / torch_ms:.2f}x" if ("int8", 1.0) in ms else "-",
                f"{best:.2f}x" + (" ok" if best <= target else " MISS") + f" (<= {target})",
                f"{share:.0%} / {share * ratio:.2f}x",
                f"{ms[('onnxruntime', 0.5)] / ms[('pytorch', 0.5)]:.2f}x",
                f"{flop_ratio:.3f}",
                f"{latency_ratio:.3f}",
                f"{tracking:.2f}x" + (" ok" if tracking <= FLOP_TRACKING_TARGET else " MISS"),
            ]
        )
    return table


HEADER = [
    "model",
    "input",
    "MFLOPs w1",
    "torch ms w1",
    "ort ms w1",
    "ort/torch w1",
    "fused ort ms w1",
    "fused/torch w1",
    "int8 ort/torch w1",
    "best ort/torch w1 (target)",
    "matrix products: share of ort w1 / as ort/torch",
    "ort/torch w0.5",
    "FLOPs w0.5/w1",
    "ort latency w0.5/w1",
    "latency/FLOP ratio",
]


def markdown(table: list[list[str]], notes: list[str]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(["# onnxruntime vs PyTorch eager (batch 1)", "", *notes, "", *lines, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model, runtime and width")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the ImageNet-style models")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    known = set(zoo.list_models())
    skipped = [name for name in args.models if name not in known]
    load_before, started = os.getloadavg()[0], time.time()
    rates = product_rates(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as workdir:
        for name in args.models:
            if name in known:
                print(f"measuring {name} ...", file=sys.stderr, flush=True)
                results.append(measure(name, args.image_size, args.repeats, args.threads, Path(workdir)))
    notes = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/bench_onnx.py "
        f"--threads {args.threads} --repeats {args.repeats} --image-size {args.image_size}` "
        f"in {time.time() - started:.0f} s.",
        f"Machine: {describe()}, 1-minute load average {load_before:.1f} before "
        f"and {os.getloadavg()[0]:.1f} after (other processes share these cores). "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{args.threads} intra-op thread(s) in both runtimes.",
        f"Random weights, batch 1, median of {args.repeats} interleaved runs after 3 warm-up runs; "
        "PyTorch runs the sliced member in eager mode under inference_mode; onnxruntime runs the exported file "
        "(CPU provider, full graph optimisation). ImageNet-style models at "
        f"{args.image_size}x{args.image_size}, slim_resnet20 at 32x32, slim_gpt_nano on a full context.",
        "The Transformers' plain exports: the ViT at opset 23 (attention as ONNX's Attention op), the GPT with its "
        "key/value cache and an underflow-safe masked attention. fused: exported with --fuse (onnxruntime's "
        "SkipLayerNormalization, BiasGelu). int8: the plain export quantized dynamically (int8 MatMul weights). "
        "'matrix products': the share of onnxruntime's kernel time in MatMul, FusedMatMul, Gemm, Conv and Attention "
        f"(its profiler, {PROFILE_RUNS} runs of the plain export), and that share times ort/torch: the ratio that "
        "removing every other op would leave, so the lowest any fusion can reach. "
        f"A 1024x1024 float32 matrix product runs at {rates['onnxruntime']:.0f} GFLOP/s in onnxruntime and "
        f"{rates['pytorch']:.0f} GFLOP/s in PyTorch on this CPU ({args.threads} thread(s)).",
        f"Targets: ort/torch <= {SPEEDUP_TARGET} for the CNNs (resnet, mobilenetv2) "
        f"and <= {TRANSFORMER_TARGET} for the "
        "Transformers (the better of plain and fused); "
        f"ort latency ratio w0.5/w1 at most {FLOP_TRACKING_TARGET}x the FLOP ratio (latency/FLOP ratio <= "
        f"{FLOP_TRACKING_TARGET}; below 1 the narrow member saves more time than FLOPs, e.g. when the wide one is "
        "bound by reading its weights at batch 1).",
    ]
    if skipped:
        notes.append(f"Skipped (not registered): {', '.join(skipped)}.")
    notes += [
        f"{r['name']} exported at opset {OLDER_OPSET} (attention as MatMul, Softmax, MatMul), in the same loop: "
        f"{r['ms'][('older opset', 1.0)]:.2f} ms in onnxruntime "
        f"against {r['ms'][('onnxruntime', 1.0)]:.2f} ms at the default opset "
        f"({r['ms'][('older opset', 1.0)] / r['ms'][('pytorch', 1.0)]:.2f}x "
        f"against {r['ms'][('onnxruntime', 1.0)] / r['ms'][('pytorch', 1.0)]:.2f}x PyTorch)."
        for r in results
        if ("older opset", 1.0) in r["ms"]
    ]
    text = markdown(rows(results), notes)
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
