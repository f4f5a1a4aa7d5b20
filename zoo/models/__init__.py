"""Model families; importing this module registers them with zoo and timm."""

from . import (
    gpt,  # noqa: F401
    mobilenetv2,  # noqa: F401
    resnet,  # noqa: F401
    vit,  # noqa: F401
)
