"""onnxruntime's fused Transformer kernels in an exported graph.

zoo's exports already write attention in the form onnxruntime runs fastest on CPU: the ViT's
as ONNX's one-kernel ``Attention`` op (opset 23), the GPT's as a masked product that keeps
softmax out of subnormal numbers (:mod:`export.kv_cache`). What is left as separate small ops is each residual
add with its LayerNorm and each bias with its GELU. onnxscript's ORT fusion rewriter
(``optimize_for_ort``, the one that matches graphs from the dynamo exporter) rewrites those into
onnxruntime's contrib kernels ``SkipLayerNormalization`` and ``BiasGelu`` (and folds the GPT's
score scale into ``FusedMatMul``). The fused graph runs only in onnxruntime and is verified
against PyTorch like any other.

It is opt-in because on CPU it loses: onnxruntime 1.32's ``SkipLayerNormalization`` took 0.20 ms
where ``Add`` + ``LayerNormalization`` took 0.038 ms (197 x 192 floats, 1 thread;
``benchmarks/bench_ort_kernels.py``), and ``BiasGelu`` onnxruntime fuses by itself at load.
``benchmarks/bench_onnx.py`` times plain and fused exports side by side; the fused kernels are
meant for execution providers that implement them fast.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import onnx
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

CONTRIB_DOMAIN = "com.microsoft"


def fuse_for_onnxruntime(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph with onnxruntime's fused kernels, and how many of each it now has."""
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    try:
        quiet.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = optimize_for_ort(ir.serde.deserialize_model(proto))
    except Exception as err:  # the rewriter raises many types; report one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"fusing the graph for onnxruntime failed: {first}") from None
    finally:
        quiet.setLevel(level)
    fused = ir.serde.serialize_model(model)
    kernels = Counter(node.op_type for node in fused.graph.node if node.domain == CONTRIB_DOMAIN)
    return fused, dict(sorted(kernels.items()))


def describe_fusions(fusions: dict[str, int] | None) -> str:
    """One line for the export summary."""
    if fusions is None:
        return (
            "onnxruntime fusions: not applied "
            "(--fuse rewrites attention and LayerNorm into onnxruntime's fused kernels)"
        )
    if not fusions:
        return "onnxruntime fusions: none matched"
    return "onnxruntime fusions: " + ", ".join(f"{count} {kernel}" for kernel, count in fusions.items())
