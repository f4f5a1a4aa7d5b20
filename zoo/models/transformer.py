"""The pre-LayerNorm Transformer block shared by the ViT and GPT families.

Elastic axes (MatFormer-style), per block: ``heads`` scales the number of attention heads
(the head dimension is fixed) and ``mlp`` the MLP hidden units; the residual width stays
fixed, so every member reads and writes the same residual stream, and a member may skip
blocks (``blocks``). QKV is one fused projection with three
row blocks (``chunks=3``), so a narrower width keeps the first heads of q, k *and* v.
With ``low_rank=True`` exactly the four big matrices of a block are factorized: qkv, the
attention output projection, and the MLP's fc1 and fc2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..importance import Coupling, out_units
from ..layers import ElasticBlocks, LayerFactory
from ..space import Dim, fixed


def trunc_normal(weight: torch.Tensor) -> None:
    """timm's Transformer initialisation of linear weights (and embeddings)."""
    nn.init.trunc_normal_(weight, std=0.02)


class Attention(nn.Module):
    """Multi-head self-attention over the active heads (as many as the qkv width gives)."""

    def __init__(self, f: LayerFactory, dim: int, num_heads: int, *, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not a multiple of num_heads {num_heads}")
        self.head_dim = dim // num_heads
        self.causal, self.dropout = causal, dropout
        heads = f.dim(num_heads, unit_size=self.head_dim, axis="heads")
        self.qkv = f.linear(fixed(dim), heads, chunks=3, init=trunc_normal)
        self.proj = f.linear(heads, fixed(dim), init=trunc_normal)
        self.proj_drop = nn.Dropout(dropout)

    @property
    def num_heads(self) -> int:
        """Heads the active sub-network runs (read from the qkv layer, so slices follow)."""
        return self.qkv.active_out // self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, 3 * H * hd) -> 3 x (B, H, N, hd); H follows the active qkv width.
        q, k, v = self.qkv(x).unflatten(-1, (3, -1, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


class Mlp(nn.Module):
    """Two linear layers with a GELU; the hidden units are elastic."""

    def __init__(self, f: LayerFactory, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        hidden_dim: Dim = f.dim(hidden, axis="mlp")
        self.fc1 = f.linear(fixed(dim), hidden_dim, init=trunc_normal)
        self.fc2 = f.linear(hidden_dim, fixed(dim), init=trunc_normal)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        f: LayerFactory,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(f, dim, num_heads, causal=causal, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(f, dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def block_couplings(blocks: ElasticBlocks) -> list[Coupling]:
    """The elastic dimensions of Transformer blocks: each block's attention heads as whole heads
    (the head's rows in q, k and v, its columns of the output projection) and its MLP hidden
    units (rows of fc1, columns of fc2). The residual width is not elastic, so it is never
    permuted."""
    found = []
    for index, block in blocks.items():
        attn, mlp = block.attn, block.mlp
        heads = out_units(attn.qkv) // attn.head_dim
        found.append(Coupling(f"blocks.{index} heads", heads, attn.head_dim, writers=[attn.qkv], readers=[attn.proj]))
        found.append(Coupling(f"blocks.{index} mlp", out_units(mlp.fc1), writers=[mlp.fc1], readers=[mlp.fc2]))
    return found
