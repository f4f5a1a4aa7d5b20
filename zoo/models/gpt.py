"""Width-slimmable (and optionally low-rank) GPT-style byte language models.

A GPT-2-style causal decoder (Radford et al. 2019) over raw bytes: 256 token ids, learned
token and position embeddings, pre-LayerNorm blocks with causal attention, a final LayerNorm
and a linear ``lm_head`` that predicts the next byte. Width scales the heads and MLP hidden
units of every block (see :mod:`zoo.models.transformer`); the embeddings, norms and lm_head
are dense and fixed. The lm_head is not tied to the token embedding because safetensors does
not store shared tensors.

The model takes int64 tokens ``(B, T)`` for any ``T <= context_length`` and returns next-byte
logits ``(B, T, 256)``; the position embedding is sliced to ``T``, so an exported graph keeps
a dynamic sequence axis (bounded by ``context_length``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..base import ElasticModel
from ..importance import Coupling
from ..layers import ElasticBlocks
from ..space import DEFAULT_GRID, Space, fixed
from ._builder import build, register_family
from .transformer import Block, block_couplings, trunc_normal

VOCAB_SIZE = 256  # one token per byte


class SlimGPT(ElasticModel):
    """A causal byte-level Transformer whose heads and MLP units (and ranks) are elastic."""

    input_kind = "tokens"

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        context_length: int = 256,
        dropout: float = 0.0,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_members: Iterable[dict] = (),
    ):
        space = Space("block", depth, ("heads", "mlp"), low_rank, skip_blocks=True)
        super().__init__(
            space=space,
            low_rank=low_rank,
            widths=widths,
            ranks=ranks,
            max_member=max_member,
            extra_members=extra_members,
        )
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        f = self._layer_factory(8)
        self.num_classes = self.vocab_size = VOCAB_SIZE
        self.context_length = context_length
        self.num_features = self.embed_dim = embed_dim

        self.tok_embed = nn.Embedding(VOCAB_SIZE, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, embed_dim))
        trunc_normal(self.tok_embed.weight)
        trunc_normal(self.pos_embed)
        self.drop = nn.Dropout(dropout)
        block = dict(causal=True, dropout=dropout, eps=1e-5)
        self.blocks = ElasticBlocks(
            {i: Block(f.at(i), embed_dim, num_heads, mlp_ratio, **block) for i in self.max_values["blocks"]}, "blocks"
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.lm_head = f.linear(fixed(embed_dim), fixed(VOCAB_SIZE), bias=False, factorize=False, init=trunc_normal)
        self.pretrained_cfg = {
            "input_size": (context_length,),
            "num_classes": VOCAB_SIZE,
            "vocab_size": VOCAB_SIZE,
            "context_length": context_length,
            "classifier": "lm_head",
        }
        self._finish_init()

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Byte ids (B, T) -> normalised hidden states (B, T, embed_dim)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{self._name} takes integer byte ids of shape (batch, seq_len), "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"{self._name}: sequence length {tokens.shape[1]} exceeds context_length {self.context_length}"
            )
        x = self.tok_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        return self.norm(self.blocks(self.drop(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Hidden states -> next-byte logits (B, T, 256)."""
        return x if pre_logits else self.lm_head(x)

    def cache_shapes(self, past: int = 0) -> list[tuple[int, ...]]:
        """The shape of every active block's cached keys and values, ``(1, heads, past, head_dim)``."""
        return [(1, b.attn.num_heads, past, b.attn.head_dim) for b in self._active_blocks() for _ in range(2)]

    def _active_blocks(self) -> list[nn.Module]:
        return [block for name, block in self.blocks.items() if name in self.blocks.active]

    def forward_cached(
        self, tokens: torch.Tensor, past: tuple[torch.Tensor, ...] | None, attend, fused=None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What ``export/kv_cache.py`` exports: the logits of ``tokens`` placed after the ``past``
        positions whose keys and values ``past`` holds (key, value per active block, as
        :meth:`cache_shapes`, broadcast to the batch), and every block's keys and values so far;
        with ``past=None`` the logits alone. ``attend(q, k, v, hidden)`` is the attention with
        ``hidden`` (0 or -inf per query and key) added to the scores. ``fused(attn, x, past_key,
        past_value)``, where given, is instead a block's whole attention with its cache (export's
        ONNX ``Attention`` op): its output before the projection and the keys and values so far."""
        batch, sequence, cached = tokens.shape[0], tokens.shape[1], 0 if past is None else past[0].shape[2]
        x = self.tok_embed(tokens) + self.pos_embed[:, cached : cached + sequence]
        positions = torch.arange(cached + sequence, device=tokens.device)
        visible = positions[None, :] <= positions[cached:, None]  # query at p sees keys at <= p
        hidden = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        present = []
        for i, block in enumerate(self._active_blocks()):
            attn = block.attn
            if fused is not None and past is not None:
                out, k, v = fused(attn, block.norm1(x), past[2 * i], past[2 * i + 1])
                present += [k, v]
                x = x + attn.proj(out)
                x = x + block.mlp(block.norm2(x))
                continue
            q, k, v = attn.qkv(block.norm1(x)).unflatten(-1, (3, -1, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            if past is not None:
                k = torch.cat([past[2 * i].expand(batch, -1, -1, -1), k], dim=2)
                v = torch.cat([past[2 * i + 1].expand(batch, -1, -1, -1), v], dim=2)
                present += [k, v]
            out = attend(q, k, v, hidden)
            x = x + attn.proj(out.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.norm2(x))
        logits = self.lm_head(self.norm(x))
        return logits if past is None else (logits, *present)

    @property
    def _name(self) -> str:
        return self.arch or type(self).__name__

    def couplings(self) -> list[Coupling]:
        """Each block's heads and MLP units (see ``transformer.block_couplings``)."""
        return block_couplings(self.blocks)

    def get_classifier(self) -> nn.Module:
        return self.lm_head

    def reset_classifier(self, num_classes: int) -> None:
        """Re-initialise the lm_head; its outputs are the 256 byte values and cannot change."""
        if num_classes != VOCAB_SIZE:
            raise ValueError(
                f"{self._name} predicts the next byte: its lm_head has {VOCAB_SIZE} outputs, "
                f"got num_classes={num_classes}"
            )
        self.lm_head = self._factory.linear(
            fixed(self.embed_dim), fixed(VOCAB_SIZE), bias=False, factorize=False, init=trunc_normal
        )
        self.set_member(self.active_member)


def _shape(embed_dim: int, depth: int, num_heads: int) -> dict:
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0)


@register_family("gpt", SlimGPT, _shape(128, 4, 4), timm=False)  # byte ids, not images: zoo only (see _builder)
def slim_gpt_nano(pretrained: bool = False, **kwargs) -> SlimGPT:
    """Byte GPT-nano: dim 128, 4 blocks, 4 heads (0.89 M parameters at context 256)."""
    return build("slim_gpt_nano", pretrained, kwargs)


@register_family("gpt", SlimGPT, _shape(384, 6, 6), timm=False)  # byte ids, not images: zoo only (see _builder)
def slim_gpt_small(pretrained: bool = False, **kwargs) -> SlimGPT:
    """Byte GPT-small: dim 384, 6 blocks, 6 heads (10.9 M parameters at context 256)."""
    return build("slim_gpt_small", pretrained, kwargs)
