"""A family as a backbone: timm's ``features_only`` model, whose feature channels follow the member.

timm wraps a model that has ``forward_intermediates`` in ``FeatureGetterNet``: it prunes the
layers after the last feature it needs and returns the intermediates as a list. Its
``feature_info`` is a copy taken when it is built, so it cannot follow an elastic model, whose
channels change with ``set_member``. :class:`FeatureNet` is the same wrapper with
``feature_info`` read from the model at the active member, and the member methods of the
family (``set_member``, ``active_member``, ...), so ``zoo.use_member(backbone, width=0.5)``
works on the backbone itself::

    backbone = zoo.create_model("slim_resnet18", features_only=True, out_indices=(2, 3, 4))
    backbone.feature_info.channels()          # [128, 256, 512]
    with zoo.use_member(backbone, width=0.5):
        backbone.feature_info.channels()      # [64, 128, 256]

``timm.create_model(name, features_only=True)`` builds the same model (``feature_cls`` may
be ``"list"`` or ``"getter"``: both mean this wrapper).
"""

from __future__ import annotations

from timm.models import FeatureInfo
from timm.models._builder import pretrained_cfg_for_features
from torch import nn

from .base import ImageModel
from .space import Member

FEATURE_CLASSES = ("list", "getter")


class FeatureNet(nn.Module):
    """The features ``out_indices`` picks from an image family (a list of NCHW maps), at the
    family's active member. The model is pruned after the last feature (timm's
    ``prune_intermediate_layers``), so every parameter it keeps is used."""

    def __init__(
        self,
        model: ImageModel,
        out_indices: int | tuple[int, ...] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
    ):
        super().__init__()
        if out_indices is None:
            out_indices = model.features_out_indices or len(model.feature_info)
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_norm=not norm))
        self.model = model
        self.norm, self.output_fmt = norm, output_fmt

    def forward(self, x):
        return self.model.forward_intermediates(
            x, indices=list(self.out_indices), norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True
        )

    @property
    def feature_info(self) -> FeatureInfo:
        """timm's ``FeatureInfo`` of the returned features, at the active member."""
        return FeatureInfo(self.model.feature_info, self.out_indices)

    @property
    def pretrained_cfg(self) -> dict:
        return pretrained_cfg_for_features(self.model.pretrained_cfg)

    default_cfg = pretrained_cfg

    # ----- the family's members ---------------------------------------------------------
    def set_member(self, *args, **kwargs) -> Member:
        """Run the backbone as one member (see ``ElasticModel.set_member``)."""
        return self.model.set_member(*args, **kwargs)

    def resolve_member(self, *args, **kwargs) -> Member:
        return self.model.resolve_member(*args, **kwargs)

    @property
    def active_member(self) -> Member:
        return self.model.active_member

    @property
    def members(self) -> list[Member]:
        return self.model.members

    @property
    def in_chans(self) -> int:
        return self.model.in_chans


def features_only(model: ImageModel, out_indices=None, feature_cls: str | None = None) -> FeatureNet:
    """``model`` as timm's ``features_only`` backbone (what ``create_model(..., features_only=True)`` returns)."""
    if not isinstance(model, ImageModel):
        raise ValueError(f"{model.arch} reads {model.input_kind}, not images: it has no features_only backbone")
    if feature_cls is not None and feature_cls not in FEATURE_CLASSES:
        raise ValueError(
            f"feature_cls must be one of {', '.join(FEATURE_CLASSES)} for an elastic family (both return a list), "
            f"got {feature_cls!r}"
        )
    return FeatureNet(model, out_indices)
