"""Model families; importing this module registers them with zoo and timm."""

from . import resnet  # noqa: F401
