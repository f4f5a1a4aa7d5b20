"""Width-slimmable (and optionally low-rank) Vision Transformers.

A ViT (Dosovitskiy et al. 2021) as timm builds it: a patch-embedding conv, a class token,
a learned position embedding, pre-LayerNorm blocks, a final norm and a linear head on the
class token. Width scales the heads and MLP hidden units of every block (see
:mod:`zoo.models.transformer`); the patch embedding, norms and head are dense and fixed.
At 224 x 224 with 16 x 16 patches the parameter counts equal timm's ``vit_tiny_patch16_224``
and ``vit_small_patch16_224``.

``patch_size`` defaults to 16 for images of 128 pixels or more and to ``img_size // 4``
below that, so small images still give a 4 x 4 grid of tokens: 8 x 8 digits use 2 x 2
patches and 32 x 32 CIFAR images 8 x 8 patches.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..base import ElasticModel, image_cfg
from ..registry import build, register_family
from ..layers import ElasticBlocks
from ..subnet import DEFAULT_GRID, Space, fixed
from .transformer import Block, trunc_normal


class SlimVisionTransformer(ElasticModel):
    """A ViT whose heads and MLP units (and, if low-rank, block matrices' ranks) are elastic."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        patch_size: int | None = None,
        drop_rate: float = 0.0,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_subnets: Iterable[dict] = (),
    ):
        space = Space("block", depth, ("heads", "mlp"), low_rank, skip_blocks=True)
        super().__init__(space=space, low_rank=low_rank, widths=widths, ranks=ranks, max_member=max_member, extra_subnets=extra_subnets)
        if patch_size is None:
            patch_size = 16 if img_size >= 128 else max(1, img_size // 4)
        if img_size < 1 or patch_size < 1 or img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
        f = self._layer_factory(8)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.img_size, self.patch_size = img_size, patch_size
        self.num_features = self.embed_dim = embed_dim

        self.patch_embed = f.conv(fixed(in_chans), fixed(embed_dim), patch_size, stride=patch_size, padding=0, bias=True, factorize=False)
        num_tokens = (img_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        trunc_normal(self.pos_embed)
        self.blocks = ElasticBlocks({i: Block(f.at(i), embed_dim, num_heads, mlp_ratio) for i in self.max_values["blocks"]}, "blocks")
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.pretrained_cfg = image_cfg(in_chans, img_size, num_classes, "patch_embed", "head")
        self._finish_init()

    def _new_head(self, num_classes: int) -> nn.Module:
        return self._factory.linear(fixed(self.embed_dim), fixed(num_classes), factorize=False, init=trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + patches, embed_dim), class token first."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"{self.arch or type(self).__name__} takes images of shape (B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(x.shape)}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self._replace_classifier("head", self._new_head(num_classes), num_classes)


def _create(arch: str, embed_dim: int, num_heads: int, pretrained: bool, kwargs: dict) -> SlimVisionTransformer:
    fixed_args = dict(embed_dim=embed_dim, depth=12, num_heads=num_heads, mlp_ratio=4.0)
    return build(SlimVisionTransformer, arch, pretrained, fixed_args, kwargs)


@register_family("vit")
def slim_vit_tiny(pretrained: bool = False, **kwargs) -> SlimVisionTransformer:
    """ViT-Tiny: dim 192, 12 blocks, 3 heads (5.72 M parameters at 224 px, 1000 classes)."""
    return _create("slim_vit_tiny", 192, 3, pretrained, kwargs)


@register_family("vit")
def slim_vit_small(pretrained: bool = False, **kwargs) -> SlimVisionTransformer:
    """ViT-Small: dim 384, 12 blocks, 6 heads (22.05 M parameters at 224 px, 1000 classes)."""
    return _create("slim_vit_small", 384, 6, pretrained, kwargs)
