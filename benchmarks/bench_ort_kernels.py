"""The onnxruntime kernels behind zoo's export choices for Transformers, each against its alternative.

Single-op graphs at the shapes of slim_gpt_nano (4 heads of 32, context 256) and slim_vit_tiny
(3 heads of 64, 197 tokens, width 192), batch 1, one thread, timed interleaved (medians):

- a causal softmax whose masked scores are -inf (what an exported ``scaled_dot_product_attention``
  gives) against the same scores floored at max - 80 (``export/kv_cache.py``), and unmasked;
- causal attention as onnxruntime's kernels (``MultiHeadAttention`` with ``unidirectional``, ONNX
  ``Attention`` with ``is_causal``) against zoo's floored masked product, with PyTorch's SDPA;
- ViT attention as ONNX ``Attention`` against MatMul/Softmax/MatMul (opset 18's export);
- ``SkipLayerNormalization`` (what ``--fuse`` makes) against ``Add`` + ``LayerNormalization``.

    python benchmarks/bench_ort_kernels.py [--repeats 200]

Prints a table and writes it to benchmarks/results/ort_kernels.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from machine import describe  # benchmarks/machine.py: the CPU for the results file
from onnx import TensorProto, helper, numpy_helper

from export.benchmark import time_interleaved
from export.kv_cache import SCORE_FLOOR
from zoo.fileio import atomic_path

RESULTS = Path(__file__).parent / "results" / "ort_kernels.md"
MS = "com.microsoft"


def session(
    nodes: list, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray] | None = None
) -> ort.InferenceSession:
    """One thread, no graph optimisation: the kernels as written."""
    graph = helper.make_graph(
        nodes,
        "kernel",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for name, a in inputs.items()
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, name) for name, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def runner(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]):
    return lambda: sess.run(["y"], feeds)


def causal_cases(rng) -> list[dict[str, object]]:
    heads, context, head_dim = 4, 256, 32
    scores = rng.standard_normal((1, heads, context, context), dtype=np.float32)
    hidden = np.triu(np.ones((context, context), bool), 1)
    masked = np.where(hidden, -np.inf, scores).astype(np.float32)
    floored = np.where(hidden, SCORE_FLOOR, scores - scores.max(-1, keepdims=True)).astype(np.float32)
    softmax = [helper.make_node("Softmax", ["x"], ["y"], axis=-1)]
    q, k, v = (rng.standard_normal((1, context, heads * head_dim), dtype=np.float32) for _ in range(3))
    q4, k4, v4 = (a.reshape(1, context, heads, head_dim).transpose(0, 2, 1, 3).copy() for a in (q, k, v))
    bias = np.where(hidden, -np.inf, 0.0).astype(np.float32)
    zoo_nodes = [  # export/kv_cache.py's floored_scores, softmax, product with v
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Add", ["s1", "bias"], ["s2"]),
        helper.make_node("ReduceMax", ["s2", "axis"], ["m"], keepdims=1),
        helper.make_node("Sub", ["s2", "m"], ["s3"]),
        helper.make_node("Clip", ["s3", "floor"], ["s4"]),  # clamp_min, as the export writes it
        helper.make_node("Softmax", ["s4"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    constants = {
        "scale": np.array(head_dim**-0.5, np.float32),
        "bias": bias,
        "axis": np.array([-1]),
        "floor": np.array(SCORE_FLOOR, np.float32),
    }
    tq, tk, tv = (torch.from_numpy(a) for a in (q4, k4, v4))
    return [
        {
            "causal softmax 4x256x256, masked with -inf": runner(session(softmax, {"x": masked}), {"x": masked}),
            "causal softmax 4x256x256, floored at max - 80 (zoo)": runner(
                session(softmax, {"x": floored}), {"x": floored}
            ),
            "softmax 4x256x256, no mask": runner(session(softmax, {"x": scores}), {"x": scores}),
        },
        {
            "causal attention: MultiHeadAttention unidirectional": runner(
                session(
                    [
                        helper.make_node(
                            "MultiHeadAttention", ["q", "k", "v"], ["y"], domain=MS, num_heads=heads, unidirectional=1
                        )
                    ],
                    dict(q=q, k=k, v=v),
                ),
                dict(q=q, k=k, v=v),
            ),
            "causal attention: ONNX Attention is_causal": runner(
                session([helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)], dict(q=q4, k=k4, v=v4)),
                dict(q=q4, k=k4, v=v4),
            ),
            "causal attention: floored masked product (zoo's GPT export)": runner(
                session(zoo_nodes, dict(q=q4, k=k4, v=v4), constants), dict(q=q4, k=k4, v=v4)
            ),
            "causal attention: PyTorch SDPA (is_causal)": lambda: F.scaled_dot_product_attention(
                tq, tk, tv, is_causal=True
            ),
        },
    ]


def vit_cases(rng) -> list[dict[str, object]]:
    heads, tokens, head_dim, width = 3, 197, 64, 192
    q, k, v = (rng.standard_normal((1, heads, tokens, head_dim), dtype=np.float32) for _ in range(3))
    decomposed = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Softmax", ["s1"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    x, skip = (rng.standard_normal((1, tokens, width), dtype=np.float32) for _ in range(2))
    norm = {"g": rng.uniform(0.5, 1.5, width).astype(np.float32), "b": rng.standard_normal(width, dtype=np.float32)}
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    return [
        {
            "ViT attention 3x197x64: ONNX Attention (opset 23 export)": runner(
                session([helper.make_node("Attention", ["q", "k", "v"], ["y"])], dict(q=q, k=k, v=v)),
                dict(q=q, k=k, v=v),
            ),
            "ViT attention 3x197x64: MatMul, Softmax, MatMul (opset 18 export)": runner(
                session(decomposed, dict(q=q, k=k, v=v), {"scale": np.array(head_dim**-0.5, np.float32)}),
                dict(q=q, k=k, v=v),
            ),
            "ViT attention 3x197x64: PyTorch SDPA": lambda: F.scaled_dot_product_attention(tq, tk, tv),
        },
        {
            "residual + LayerNorm 197x192: SkipLayerNormalization (--fuse)": runner(
                session(
                    [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"], domain=MS, epsilon=1e-6)],
                    {"x": x, "s": skip},
                    norm,
                ),
                {"x": x, "s": skip},
            ),
            "residual + LayerNorm 197x192: Add, LayerNormalization": runner(
                session(
                    [
                        helper.make_node("Add", ["x", "s"], ["r"]),
                        helper.make_node("LayerNormalization", ["r", "g", "b"], ["y"], epsilon=1e-6),
                    ],
                    {"x": x, "s": skip},
                    norm,
                ),
                {"x": x, "s": skip},
            ),
        },
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per kernel")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    load_before, started = os.getloadavg()[0], time.time()
    groups = causal_cases(rng) + vit_cases(rng)
    with torch.inference_mode():
        timings = [time_interleaved(cases, args.repeats, warmup=10) for cases in groups]
    lines = [
        "# onnxruntime kernels behind zoo's Transformer exports",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} "
        f"by `python benchmarks/bench_ort_kernels.py --repeats {args.repeats}` "
        f"in {time.time() - started:.0f} s. Machine: {describe()}, 1-minute load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after; "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, "
        f"one thread. Single-op graphs, no graph optimisation, batch 1, median of {args.repeats} interleaved runs; "
        "each group's first line is the reference for its ratios.",
        "",
        "| kernel | ms | vs first of its group |",
        "|---|---|---|",
    ]
    for ms in timings:
        first = next(iter(ms.values()))
        lines += [f"| {name} | {t:.3f} | {t / first:.2f}x |" for name, t in ms.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
