"""Model families; importing this module registers them with zoo and timm."""

from . import mobilenetv2  # noqa: F401
from . import resnet  # noqa: F401
from . import vit  # noqa: F401
from . import gpt  # noqa: F401
