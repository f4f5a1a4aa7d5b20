"""Cached decoding for language models: the exported graph also takes and returns keys and values.

Without a cache, generating a byte recomputes every position of the context. A language-model
export therefore has, besides ``input`` -> ``logits``, per block ``i`` two optional inputs
``past_key_values.<i>.key`` and ``.value`` (float32 ``[1, heads, past, head_dim]``: the keys
and values of the ``past`` positions before ``input``, for one sequence; ``heads`` are the
key/value heads of grouped-query attention) and two outputs
``present.<i>.key`` and ``.value`` (``[batch, heads, past + sequence, head_dim]``). The inputs
default to an empty cache (``past`` = 0: they are initializers that a caller may override), so
``input`` alone still gives the plain logits at any batch size, as the export contract says;
a cache of batch 1 is broadcast to the batch (cached decoding is for one sequence).

The positions of ``input`` are ``past .. past + sequence - 1`` (rotary angles included) and
must stay within the model's ``context_length``: past the context a byte model's absolute
position embeddings shift, and every position must be recomputed (``export/runtime.py`` does
that); a model with a tokenizer stops there. What each family computes is its own
``forward_cached`` method (``zoo/models/``); this module adds the attention and the file's form.

``zoo export`` (opset 23, the default for models with attention) writes each block's attention
as ONNX's ``Attention`` op with the cache as its ``past_key``/``past_value`` and ``is_causal``
(:func:`onnx_attention`): onnxruntime runs it as one kernel that concatenates the cache
itself, on q, k and v as ``[batch, sequence, width]`` (no transposes). With the written-out
attention below, GPT-nano's export had taken 1.19x / 1.31x (batch 1 / 8) the time of
onnxruntime's own matrix products and attention at the same shapes
(``benchmarks/results/ort_floor_avx512.md``; with the op: ``ort_floor.md``). ``scaled_dot_product_attention``
could not give this: its export has no cache inputs, and with a past its causal mask is aligned
to the first key, not the last.

Below opset 23, and for the TorchScript exporter that ``zoo search`` times with, attention is
written out instead (:func:`masked_attention`), not left to ``scaled_dot_product_attention``,
whose export masks scores with -inf: onnxruntime's Softmax computes exp of masked scores
through subnormal numbers, which are slow on some x86 CPUs (``benchmarks/bench_ort_kernels.py``:
a 4 x 256 x 256 causal softmax 0.66 ms masked with -inf, 0.17 ms floored as here, 0.16 ms
unmasked on one machine; 0.16 ms in all three on an AVX-512 EPYC). Scores are shifted by their
visible maximum and clamped at -80, so every exp stays a normal float; a masked key then weighs
e^-80 (2e-35) instead of 0, far below float32's resolution of the weights.
"""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from zoo import ElasticModel

PAST, PRESENT = "past_key_values", "present"
PARTS = ("key", "value")
SCORE_FLOOR = -80.0  # e^-80 is a normal float32 (the smallest is about e^-87.3)


def cache_names(prefix: str, layers: int) -> list[str]:
    """``prefix.<i>.key``, ``prefix.<i>.value`` for every block, in block order."""
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in PARTS]


class CachedDecoder(nn.Module):
    """A sliced language model's forward pass with the keys and values of earlier positions as
    inputs: the family's ``forward_cached`` (its layout: positions, grouped heads), with the
    floored attention below; with ``onnx_op`` (export at opset 23), a family that can (the byte
    GPT: zoo's ``Attention`` blocks) runs each block's attention and cache as ONNX's op
    (:func:`onnx_attention`). It computes what ``model(tokens)`` computes for the positions
    after the cache; export verification compares the two.
    """

    def __init__(self, model: ElasticModel, onnx_op: bool = False):
        super().__init__()
        if model.input_kind != "tokens":
            raise ValueError(f"{model.arch} is not a language model; only those decode with a cache")
        if not hasattr(model, "forward_cached"):
            raise ValueError(f"{model.arch}: ONNX export (decoding with a key/value cache) is not implemented")
        self.model = model
        # a family whose forward_cached takes ``fused`` runs each block's attention with its cache as one op
        takes_fused = "fused" in inspect.signature(model.forward_cached).parameters
        self._fused = {"fused": onnx_attention} if onnx_op and takes_fused else {}

    def cache_shapes(self, past: int = 0) -> list[tuple[int, ...]]:
        """The shape of every cache input (key, value per block) for ``past`` positions."""
        return self.model.cache_shapes(past)

    @property
    def layers(self) -> int:
        """The number of blocks whose keys and values are cached."""
        return len(self.cache_shapes()) // len(PARTS)

    def forward(
        self, tokens: torch.Tensor, past: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The logits and every block's keys and values after ``past``; with no ``past``, the
        logits alone, computed as the exported file computes them (what ``zoo search`` times)."""
        return self.model.forward_cached(tokens, past, masked_attention, **self._fused)


def onnx_attention(
    attn: nn.Module, x: torch.Tensor, past_key: torch.Tensor | None = None, past_value: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn`` (:class:`zoo.models.transformer.Attention`) on ``x`` as ONNX's ``Attention`` op (opset
    23), with a batch-1 cache broadcast to the batch if given: the output before the projection and
    the keys and values after the cache. q, k and v stay ``[batch, sequence, heads * head_dim]``, so
    the graph has no transposes, and the op concatenates the cache itself. Only for export: with a
    past, onnxruntime aligns the causal mask to the last key (a query at position ``past + i`` sees
    keys ``<= past + i``), whereas the op's PyTorch reference aligns it to the first."""
    batch, heads = x.shape[0], attn.num_heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)  # the qkv rows are (3, heads, head_dim): q, k, v are heads-major
    cache = {}
    if past_key is not None:
        cache = dict(past_key=past_key.expand(batch, -1, -1, -1), past_value=past_value.expand(batch, -1, -1, -1))
    out, key, value, _ = torch.onnx.ops.attention(
        q, k, v, **cache, is_causal=attn.causal, q_num_heads=heads, kv_num_heads=heads
    )
    return out, key, value


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Softmax attention of ``q`` over the keys that ``hidden`` leaves visible (see
    :func:`floored_scores`)."""
    return floored_scores(q, k, hidden).softmax(-1) @ v


def floored_scores(q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Scaled scores shifted by each row's visible maximum and clamped at ``SCORE_FLOOR``, so
    that softmax takes no exp below e^-80 (see above). ``hidden`` is 0 or -inf per query and
    key, added to the scores: an add broadcasts faster than a select in onnxruntime."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + hidden
    return (scores - scores.amax(-1, keepdim=True)).clamp_min(SCORE_FLOOR)


def add_empty_cache_defaults(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give every cache input an empty initializer of the same name: omitted, it means no past."""
    for graph_input in proto.graph.input:
        if graph_input.name.startswith(PAST + "."):
            dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
            dims[2] = 0
            proto.graph.initializer.append(numpy_helper.from_array(np.zeros(dims, np.float32), graph_input.name))
    return proto
