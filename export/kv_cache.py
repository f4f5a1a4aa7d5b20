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

Attention is written out rather than left to ``scaled_dot_product_attention``, whose export
masks scores with -inf: onnxruntime's Softmax computes exp of masked scores through subnormal
numbers, which are slow on x86 CPUs (``benchmarks/bench_ort_kernels.py``: a 4 x 256 x 256
causal softmax 0.66 ms masked with -inf, 0.17 ms floored as here, 0.16 ms unmasked). Scores
are shifted by their visible maximum and clamped at -80, so every exp stays a normal float; a
masked key then weighs e^-80 (2e-35) instead of 0, far below float32's resolution of the
weights.
"""

from __future__ import annotations

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
    floored attention below. It computes what ``model(tokens)`` computes for the positions
    after the cache; export verification compares the two.
    """

    def __init__(self, model: ElasticModel):
        super().__init__()
        if model.input_kind != "tokens":
            raise ValueError(f"{model.arch} is not a language model; only those decode with a cache")
        if not hasattr(model, "forward_cached"):
            raise ValueError(f"{model.arch}: ONNX export (decoding with a key/value cache) is not implemented")
        self.model = model

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
        return self.model.forward_cached(tokens, past, masked_attention)


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
