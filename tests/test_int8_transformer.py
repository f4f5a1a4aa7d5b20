"""Static int8 for Transformers (``static-matmul``): a GPT exported, quantized, run in onnxruntime
and compared with PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import zoo
from export.kv_cache import CachedDecoder
from export.latency import export_fast
from export.quantize import activation_products, quantize_int8


def logits(path, tokens: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": tokens.numpy()})[0]


def test_static_matmul_quantizes_the_weight_products_only_and_stays_close_to_pytorch(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("slim_gpt_nano", context_length=16).eval()
    with torch.no_grad():
        for param in model.parameters():  # fresh weights hide mistakes (zero biases, unit norms)
            param.add_(torch.randn(param.shape) * 0.05)
    model = zoo.slice(model, model.members[-1]).eval()  # what is exported: plain layers, weights constant
    tokens = torch.randint(0, 256, (5, 4, 16), generator=torch.Generator().manual_seed(0))
    # the export's attention (export/kv_cache.py) through the exporter that zoo search uses: under a second
    export_fast(CachedDecoder(model), tokens[0], tmp_path / "gpt.onnx")
    quantize_int8(tmp_path / "gpt.onnx", tmp_path / "int8.onnx", "static-matmul", [t.numpy() for t in tokens[:4]])

    attention_products = activation_products(tmp_path / "gpt.onnx")
    assert len(attention_products) == 2 * 4  # scores and probabilities times values, in each of 4 blocks
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    products = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]  # biased ones become Gemm
    quantized = [node for node in products if node.input[1] in dequantized]
    assert len(quantized) == 4 * 4 + 1  # qkv, proj, fc1 and fc2 of each block, and the head
    assert all(node.input[0] in dequantized for node in quantized)  # static: their inputs are int8 too
    assert sorted(node.name for node in products if node not in quantized) == sorted(attention_products)
    assert not any(name in dequantized for node in products if node not in quantized for name in node.input)

    with torch.no_grad():
        expected = model(tokens[4]).numpy()
    got = logits(tmp_path / "int8.onnx", tokens[4])
    assert 0 < np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_static_int8_needs_calibration_data(tmp_path):
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "int8.onnx", "static-matmul", [])
