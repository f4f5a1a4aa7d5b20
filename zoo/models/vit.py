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

The model takes ``img_size`` images only, unless it is built with ``dynamic_img_size=True``:
then any size that is a multiple of the patch size, the position embedding resampled to the
grid at every forward (timm's ``resample_abs_pos_embed``, as timm's ViT does). Its features as
a backbone (``forward_intermediates``, ``features_only``) are every block's tokens.
"""

from __future__ import annotations

from typing import Iterable

import torch
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed
from timm.models import vision_transformer as timm_vit
from timm.models._features import feature_take_indices
from torch import nn

from ..base import ImageModel, image_cfg
from ..convert import Plan, converts, is_type, kind, refuse, require, require_linear_head
from ..importance import Coupling
from ..layers import ElasticBlocks
from ..registry import variants
from ..space import DEFAULT_GRID, Space, channel_divisor, fixed
from ._builder import build, register_family
from .transformer import Block, block_couplings, trunc_normal

POOLS = ("token", "avg", "")  # the class token, the mean of the patch tokens, or all tokens


@torch.fx.wrap  # torch.fx records the call, so a traced model checks its input too
def _check_images(x: torch.Tensor, name: str, in_chans: int, img_size: int, patch_size: int) -> torch.Tensor:
    """``x`` if it is a batch of images this ViT takes: ``img_size`` square, or (``img_size=0``)
    any multiple of the patch size."""
    shape = list(x.shape)
    if len(shape) != 4 or shape[1] != in_chans:
        raise ValueError(f"{name} takes images of shape (B, {in_chans}, H, W), got {shape}")
    if img_size and (shape[2] != img_size or shape[3] != img_size):
        raise ValueError(
            f"{name} takes images of shape (B, {in_chans}, {img_size}, {img_size}), got {shape} "
            "(build it with dynamic_img_size=True for other sizes)"
        )
    if shape[2] % patch_size or shape[3] % patch_size:
        raise ValueError(f"{name} takes images whose sides are multiples of its patch size {patch_size}, got {shape}")
    return x


class SlimVisionTransformer(ImageModel):
    """A ViT whose heads and MLP units (and, if low-rank, block matrices' ranks) are elastic."""

    features_out_indices = 3  # features_only's default, as timm's ViTs: the last three blocks
    fixed_input_size = True  # the position embedding fixes the image size (unless dynamic_img_size)

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
        global_pool: str = "token",
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_members: Iterable[dict] = (),
        round_channels: int | None = None,
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
        if patch_size is None:
            patch_size = 16 if img_size >= 128 else max(1, img_size // 4)
        if img_size < 1 or patch_size < 1 or img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
        f = self._layer_factory(channel_divisor(round_channels, 8))
        self.num_classes, self.in_chans = num_classes, in_chans
        self.img_size, self.patch_size = img_size, patch_size
        self.dynamic_img_size = bool(dynamic_img_size)
        self.global_pool = self._check_global_pool(global_pool, POOLS)
        self.num_features = self.embed_dim = embed_dim

        self.patch_embed = f.conv(
            fixed(in_chans), fixed(embed_dim), patch_size, stride=patch_size, padding=0, bias=True, factorize=False
        )
        num_tokens = (img_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        trunc_normal(self.pos_embed)
        self.blocks = ElasticBlocks(
            {i: Block(f.at(i), embed_dim, num_heads, mlp_ratio) for i in self.max_values["blocks"]}, "blocks"
        )
        self._taps = [(fixed(embed_dim), patch_size, f"blocks.{i}") for i in self.max_values["blocks"]]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.pretrained_cfg = image_cfg(
            in_chans, img_size, num_classes, "patch_embed", "head", fixed_input_size=not self.dynamic_img_size
        )
        self._finish_init()

    def _new_head(self, num_classes: int) -> nn.Module:
        return self._classifier(fixed(self.embed_dim), num_classes, init=trunc_normal)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the class token and the patch tokens, position embedded."""
        x = _check_images(x, self.arch, self.in_chans, 0 if self.dynamic_img_size else self.img_size, self.patch_size)
        x = self.patch_embed(x)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            grid = self.img_size // self.patch_size
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=x.shape[-2:], old_size=(grid, grid), num_prefix_tokens=1
            )
        x = x.flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + patches, embed_dim), class token first."""
        return self.norm(self.blocks(self._tokens(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """timm's: the tokens after each block ``indices`` picks (the last n if an int, all if
        None), as maps (NCHW) or sequences (NLC) of the patch tokens, and the final features.
        A block the member skips passes its input on, so its feature is the previous one's."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"a ViT's intermediate features are NCHW or NLC, got output_fmt={output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        height, width = x.shape[-2:]
        x = self._tokens(x)
        intermediates = []
        for i, (name, block) in enumerate(self.blocks.items()):
            if stop_early and i > last:
                break
            if name in self.blocks.active:
                x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :1] for y in intermediates]
        intermediates = [y[:, 1:] for y in intermediates]
        if output_fmt == "NCHW":
            grid = (height // self.patch_size, width // self.patch_size)
            intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's: drop the blocks after the last one ``indices`` needs, the final norm if
        ``prune_norm`` and the head if ``prune_head``. Returns the absolute indices."""
        take, last = feature_take_indices(len(self.blocks), indices)
        for name in list(self.blocks.keys())[last + 1 :]:
            del self.blocks[name]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        self.set_member(self.active_member, for_training=True)  # the blocks it still holds
        return take

    def couplings(self) -> list[Coupling]:
        """Each block's heads and MLP units (see ``transformer.block_couplings``)."""
        return block_couplings(self.blocks)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = self._check_global_pool(global_pool, POOLS)
        self._replace_classifier("head", self._new_head(num_classes), num_classes)


MLP_RATIO = 4.0  # every zoo ViT's (timm's standard)


def _shape(embed_dim: int, num_heads: int, depth: int = 12) -> dict:
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=MLP_RATIO)


@register_family("vit", SlimVisionTransformer, _shape(192, 3))
def slim_vit_tiny(pretrained: bool = False, **kwargs) -> SlimVisionTransformer:
    """ViT-Tiny: dim 192, 12 blocks, 3 heads (5.72 M parameters at 224 px, 1000 classes)."""
    return build("slim_vit_tiny", pretrained, kwargs)


@register_family("vit", SlimVisionTransformer, _shape(384, 6))
def slim_vit_small(pretrained: bool = False, **kwargs) -> SlimVisionTransformer:
    """ViT-Small: dim 384, 12 blocks, 6 heads (22.05 M parameters at 224 px, 1000 classes)."""
    return build("slim_vit_small", pretrained, kwargs)


@register_family("vit", SlimVisionTransformer, _shape(768, 12))
def slim_vit_base(pretrained: bool = False, **kwargs) -> SlimVisionTransformer:
    """ViT-Base: dim 768, 12 blocks, 12 heads (86.57 M parameters at 224 px, 1000 classes)."""
    return build("slim_vit_base", pretrained, kwargs)


@register_family("vit", SlimVisionTransformer, _shape(1024, 16, depth=24))
def slim_vit_large(pretrained: bool = False, **kwargs) -> SlimVisionTransformer:
    """ViT-Large: dim 1024, 24 blocks, 16 heads (304.33 M parameters at 224 px, 1000 classes)."""
    return build("slim_vit_large", pretrained, kwargs)


# ----- conversion from timm's ViTs (zoo.from_timm) --------------------------------------------
def _shapes() -> dict[tuple[int, int, int], str]:
    """(embed_dim, depth, heads) -> the variant zoo has with that shape."""
    keys = ("embed_dim", "depth", "num_heads")
    return {tuple(v.fixed_args[k] for k in keys): v.name for v in variants(SlimVisionTransformer)}


@converts(timm_vit.VisionTransformer, "ViT/DeiT with standard blocks")
def plan_from_timm(model: nn.Module, name: str) -> Plan:
    """How timm's ViT becomes zoo's; refuses the first part zoo's does not compute."""
    if not is_type(model, timm_vit.VisionTransformer):
        raise refuse(name, "the distillation token" if hasattr(model, "dist_token") else f"the {kind(model)} variant")
    require(
        model.global_pool == "token" and model.attn_pool is None,
        name,
        f"global pooling {model.global_pool!r} (zoo's ViTs read the class token)",
    )
    require(model.cls_token is not None, name, "a ViT without a class token")
    require(model.num_reg_tokens == 0, name, f"{model.num_reg_tokens} register tokens")
    require(
        not model.no_embed_class,
        name,
        "a position embedding without the class token's (no_embed_class, as in DeiT III)",
    )
    require(not model.dynamic_img_size, name, "a dynamic image size")
    require(is_type(model.norm_pre, nn.Identity), name, "a norm before the blocks (pre_norm)")
    require(is_type(model.fc_norm, nn.Identity), name, "a norm after pooling (fc_norm)")
    require_linear_head(model, name, "head")
    pe = model.patch_embed
    require(
        is_type(pe, PatchEmbed) and is_type(pe.proj, nn.Conv2d) and is_type(pe.norm, nn.Identity),
        name,
        f"the patch embedding {kind(pe)} (with {kind(getattr(pe, 'norm', nn.Identity()))})",
    )
    require(
        pe.img_size[0] == pe.img_size[1] and pe.patch_size[0] == pe.patch_size[1],
        name,
        f"non-square images or patches ({pe.img_size}, {pe.patch_size})",
    )
    embed_dim, depth = model.embed_dim, len(model.blocks)
    heads = model.blocks[0].attn.num_heads if depth else 0
    modules = [("patch_embed", "patch_embed.proj")]
    for i, b in enumerate(model.blocks):
        _require_block(b, f"blocks.{i}", embed_dim, heads, name)
        parts = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        modules += [(f"blocks.{i}.{part}", f"blocks.{i}.{part}") for part in parts]
    shapes = _shapes()
    arch = shapes.get((embed_dim, depth, heads))
    require(
        arch is not None,
        name,
        f"the shape (dim {embed_dim}, {depth} blocks, {heads} heads; zoo has {', '.join(shapes.values())})",
    )
    args = {
        "num_classes": model.num_classes,
        "in_chans": pe.proj.in_channels,
        "img_size": pe.img_size[0],
        "patch_size": pe.patch_size[0],
        "drop_rate": float(model.head_drop.p),
    }
    plan = Plan(name, arch, args, [*modules, ("norm", "norm"), ("head", "head")])
    plan.tensors = [("cls_token", "cls_token"), ("pos_embed", "pos_embed")]
    return plan


def _require_block(b: nn.Module, at: str, embed_dim: int, heads: int, name: str) -> None:
    """timm's block ``at`` computes what zoo's Transformer block computes."""
    attn, mlp = b.attn, b.mlp
    require(is_type(b, timm_vit.Block), name, f"the block type {kind(b)} ({at})")
    require(is_type(attn, timm_vit.Attention) and attn.num_heads == heads, name, f"the attention {kind(attn)} of {at}")
    require(is_type(attn.q_norm, nn.Identity) and is_type(attn.k_norm, nn.Identity), name, f"qk-norm ({at}.attn)")
    require(
        is_type(getattr(attn, "norm", nn.Identity()), nn.Identity), name, f"a norm inside attention ({at}.attn.norm)"
    )
    require(is_type(b.ls1, nn.Identity) and is_type(b.ls2, nn.Identity), name, f"layer scale ({at}.ls1, init_values)")
    require(is_type(mlp, Mlp) and is_type(mlp.norm, nn.Identity), name, f"the MLP {kind(mlp)} of {at}")
    require(
        is_type(mlp.act, nn.GELU) and mlp.act.approximate == "none", name, f"the MLP activation {kind(mlp.act)} of {at}"
    )
    require(
        mlp.fc1.out_features == MLP_RATIO * embed_dim,
        name,
        f"the MLP ratio {mlp.fc1.out_features / embed_dim:g} (zoo's ViTs use {MLP_RATIO:g})",
    )
