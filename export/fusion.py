"""onnxruntime's fused Transformer kernels in an exported graph.

PyTorch's exporter writes attention as MatMul, Softmax and MatMul, and each residual add and
LayerNorm as separate ops. onnxscript's ORT fusion rewriter (``optimize_for_ort``, the one
that matches graphs from the dynamo exporter; onnxruntime's own transformer optimizer finds no
attention in them) rewrites them into onnxruntime's contrib kernels: ``MultiHeadAttention``,
``SkipLayerNormalization`` (residual add + LayerNorm), ``BiasGelu``. The fused graph runs only
in onnxruntime and is verified against PyTorch like any other.

It is opt-in: on a 1-thread AMD EPYC (Zen 1) these kernels were slower than what onnxruntime
makes of the plain graph (``benchmarks/bench_onnx.py`` measures both side by side), because
batch-1 Transformers there are bound by their matrix products, which fusion does not change.
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
        return "onnxruntime fusions: not applied (--fuse rewrites attention and LayerNorm into onnxruntime's fused kernels)"
    if not fusions:
        return "onnxruntime fusions: none matched"
    return "onnxruntime fusions: " + ", ".join(f"{count} {kernel}" for kernel, count in fusions.items())
