"""int8 quantization with onnxruntime, and what it costs on validation data.

CNNs (the batch-norm families) get static QDQ quantization: weights per channel and
activations, both int8, with activation ranges calibrated on real inputs (MinMax), after
``quant_pre_process`` folds batch norm into the convs so that the folded weights are what
gets quantized. Transformers get dynamic quantization of their MatMul/Gemm weights:
activation ranges are computed per batch at run time, which suits LayerNorm'd activations
with outliers, and needs no calibration data. ``static-matmul`` is the calibrated variant for
Transformers: static QDQ of the weight products only (MatMul/Gemm with a constant weight).
Quantizing every op (``static``) ruined a GPT whose attention was written out (below opset 23,
:mod:`export.kv_cache`): the causal mask's additions and the floored scores span a range that
int8 cannot hold (GPT-nano's bits per byte 2.89 -> 4.55), and the products of attention
(scores, probabilities times values) gain little and add quantize/dequantize pairs. ONNX's
``Attention`` op, which zoo's opset-23 exports use, stays float in every method
(``benchmarks/bench_ort_floor.py``).

The price is measured, not assumed: the fp32 and int8 files run on the same validation
batches in onnxruntime and the report gives both metrics and their difference.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from .verify import INPUT_NAME, OUTPUT_NAME, session

METHODS = {
    "static": "static QDQ (int8 per-channel weights, int8 activations, MinMax calibration)",
    "dynamic": "dynamic (int8 MatMul/Gemm weights, activations quantized per batch)",
    "static-matmul": "static QDQ of weight products (int8 per-channel MatMul/Gemm weights in 7 bits and their "
    "inputs, MinMax calibration)",
}
PRODUCTS = ("MatMul", "Gemm")


def method_for(uses_batchnorm: bool) -> str:
    """Static for CNNs (batch-norm families), dynamic for Transformers."""
    return "static" if uses_batchnorm else "dynamic"


class _ArrayReader(CalibrationDataReader):
    """Feeds calibration batches (numpy arrays) to onnxruntime's calibrator."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    fp32_path: str | os.PathLike, out_path: str | os.PathLike, method: str, calibration: list[np.ndarray] | None = None
) -> None:
    """Write the int8 version of ``fp32_path`` to ``out_path`` (both plain paths; the caller renames)."""
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "dynamic" and not calibration:
        raise ValueError("static int8 quantization needs calibration data (--calibrate DATA)")
    with tempfile.TemporaryDirectory(prefix="zoo-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        # onnxruntime's symbolic shape inference cannot follow the exporter's attention graphs; ONNX
        # shape inference plus the graph optimizer (batch norm folding) is what quantization needs.
        # Its sessions would warn, once per cache input, that the key/value cache defaults (meant to
        # be overridden) are not constants; onnxruntime's default logger has no other switch.
        ort.set_default_logger_severity(3)
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        finally:
            ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        if method == "dynamic":
            quantize_dynamic(
                prepared,
                out_path,
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
            return
        only = {}
        if method == "static-matmul":
            # reduce_range: 7-bit weights, so that the int16 sums of x86 AVX2 kernels without VNNI do not
            # saturate (on such an EPYC a test GPT's logits were 0.70 off with 8 bits, 0.12 with 7)
            only = dict(
                op_types_to_quantize=list(PRODUCTS), nodes_to_exclude=activation_products(prepared), reduce_range=True
            )
        quantize_static(
            prepared,
            out_path,
            _ArrayReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            **only,
        )


def activation_products(path: Path) -> list[str]:
    """The MatMul/Gemm nodes of the model at ``path`` whose second factor is no weight (attention's
    scores and probabilities times values): left in float by ``static-matmul``."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    weights |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    return [node.name for node in graph.node if node.op_type in PRODUCTS and node.input[1] not in weights]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def evaluate(
    path: str | os.PathLike,
    batches: list[tuple[np.ndarray, np.ndarray]],
    kind: str,
    sess: ort.InferenceSession | None = None,
    feed: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Accuracy and loss (images) or bits per byte and loss (byte tokens) of an ONNX file
    (``sess``: a session of ``path`` already started; ``feed``: more inputs, e.g. ``member``)."""
    sess = sess or session(path, "cpu")
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in batches:
        logits = sess.run([OUTPUT_NAME], {INPUT_NAME: inputs, **(feed or {})})[0].astype(np.float64)
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        log_probs = _log_softmax(logits)
        total_loss -= float(log_probs[np.arange(len(targets)), targets].sum())
        correct += int((logits.argmax(-1) == targets).sum())
        count += len(targets)
    if count == 0:
        raise ValueError("no validation data to evaluate the quantized model on")
    loss = total_loss / count
    if kind == "tokens":
        return {"bits_per_byte": loss / math.log(2), "loss": loss}
    return {"accuracy": correct / count, "loss": loss}


def quantization_report(
    fp32_path: Path,
    int8_path: Path,
    method: str,
    kind: str,
    calibration: list[np.ndarray] | None,
    validation: list[tuple[np.ndarray, np.ndarray]],
) -> dict:
    """The int8 file's cost: metrics of both files on the same validation batches, and the
    float32 size (the int8 file's own size is that of the file finally written, metadata
    included, so it is not recorded here)."""
    fp32, int8 = evaluate(fp32_path, validation, kind), evaluate(int8_path, validation, kind)
    return {
        "method": METHODS[method],
        "calibration_samples": sum(len(b) for b in calibration or []),
        "validation_samples": sum(t.size for _, t in validation),  # examples, or bytes for text
        "validation_batches": len(validation),
        "fp32": fp32,
        "int8": int8,
        "change": {name: int8[name] - fp32[name] for name in fp32},
        "fp32_bytes": fp32_path.stat().st_size,
    }


def int8_record(record: dict, quantize: str, report: dict) -> dict:
    """The zoo record of an int8 file: ``metrics`` are its own, measured in onnxruntime on the
    report's validation batches; the float32 file's, on the same batches, stay in
    ``quantization["fp32"]``."""
    return {**record, "quantized": quantize, "quantization": report, "metrics": dict(report["int8"])}
