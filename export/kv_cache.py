"""Cached decoding for the byte GPTs: the exported graph also takes and returns keys and values.

Without a cache, generating a byte recomputes every position of the context. A language-model
export therefore has, besides ``input`` -> ``logits``, per block ``i`` two optional inputs
``past_key_values.<i>.key`` and ``.value`` (float32 ``[1, heads, past, head_dim]``: the keys
and values of the ``past`` positions before ``input``, for one sequence) and two outputs
``present.<i>.key`` and ``.value`` (``[batch, heads, past + sequence, head_dim]``). The inputs
default to an empty cache (``past`` = 0: they are initializers that a caller may override), so
``input`` alone still gives the plain logits at any batch size, as the export contract says;
a cache of batch 1 is broadcast to the batch (cached decoding is for one sequence).

The positions of ``input`` are ``past .. past + sequence - 1`` and must stay within the
model's ``context_length``: past the context the absolute position embeddings shift, and
every position must be recomputed (``export/runtime.py`` does that).

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
    """A sliced GPT's forward pass with the keys and values of earlier positions as inputs.

    It reuses the model's own modules and computes what ``model(tokens)`` computes for the
    positions after the cache; export verification compares the two.
    """

    def __init__(self, model: ElasticModel, onnx_attention: bool = False):
        super().__init__()
        if model.input_kind != "tokens":
            raise ValueError(f"{model.arch} is not a language model; only those decode with a cache")
        if not getattr(model, "cached_decoding", True):
            raise ValueError(f"{model.arch}: ONNX export (decoding with a key/value cache) is not implemented yet")
        self.model, self.onnx_attention = model, onnx_attention
        self.blocks = list(model.blocks.children())  # a sliced member holds exactly the blocks it runs

    def cache_shapes(self, past: int = 0) -> list[tuple[int, ...]]:
        """The shape of every cache input (key, value per block) for ``past`` positions."""
        return [(1, block.attn.num_heads, past, block.attn.head_dim) for block in self.blocks for _ in PARTS]

    def forward(
        self, tokens: torch.Tensor, past: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The logits and every block's keys and values after ``past``; with no ``past``, the
        logits alone, computed as the exported file computes them (what ``zoo search`` times)."""
        model = self.model
        batch, sequence, cached = tokens.shape[0], tokens.shape[1], 0 if past is None else past[0].shape[2]
        x = model.tok_embed(tokens) + model.pos_embed[:, cached : cached + sequence]
        positions = torch.arange(cached + sequence, device=tokens.device)
        visible = positions[None, :] <= positions[cached:, None]  # query at p sees keys at <= p
        hidden = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        present = []
        for i, block in enumerate(self.blocks):
            attn = block.attn
            if self.onnx_attention and past is not None:
                out, key, value = onnx_attention(attn, block.norm1(x), past[2 * i], past[2 * i + 1])
                present += [key, value]
                x = x + attn.proj(out)
                x = x + block.mlp(block.norm2(x))
                continue
            q, k, v = attn.qkv(block.norm1(x)).unflatten(-1, (3, -1, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            if past is not None:
                k = torch.cat([past[2 * i].expand(batch, -1, -1, -1), k], dim=2)
                v = torch.cat([past[2 * i + 1].expand(batch, -1, -1, -1), v], dim=2)
                present += [k, v]
            out = masked_attention(q, k, v, hidden)
            x = x + attn.proj(out.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.norm2(x))
        logits = model.lm_head(model.norm(x))
        return logits if past is None else (logits, *present)


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
