"""zoo: train a family of nested networks in one run, slice any member out, export it.

    import zoo
    model = zoo.create_model("slim_resnet20", num_classes=10)
    model.set_member(width=0.5)                  # or a member: {"width": [0.5, 1, 1], "depth": [1, 3, 3]}
    small = zoo.slice(model, width=0.5)
    zoo.save(small, "small.safetensors")
    same = zoo.load("small.safetensors")
    family = zoo.from_timm("resnet50", checkpoint="ckpt.safetensors")   # bring your own model
    lm = zoo.from_transformers("llama-folder")   # a transformers causal LM (pip install 'zoo[lm]')
    zoo.slice_to_transformers("lm.safetensors", "small-llama", width=0.5)   # a transformers folder again
    zoo.save_pretrained(family, "my-family")     # timm.create_model("local-dir:my-family", pretrained=True)

Importing zoo registers every image family with timm, so ``timm.create_model("slim_resnet20")``
works too (the byte-level GPTs are zoo's only: timm's registry is for images).
"""

from . import models  # noqa: F401,E402  (registers the families with zoo, the image ones with timm)
from .base import ElasticModel
from .convert import UnsupportedModel, from_timm
from .convert_lm import from_transformers
from .flops import count_flops
from .hub import save_pretrained
from .members import SlicedMember, WeightsSource, slice_file
from .registry import create_model, family_of, list_models
from .slicing import count_params, parameter_masks, recalibrate_bn, use_member
from .slicing import slice_model as slice
from .space import Member
from .transformers_out import save_transformers, slice_to_transformers
from .weights import WeightsFileError, load, read_header, save

__version__ = "0.1.0"

__all__ = [
    "ElasticModel",
    "SlicedMember",
    "Member",
    "WeightsSource",
    "UnsupportedModel",
    "WeightsFileError",
    "count_flops",
    "count_params",
    "create_model",
    "family_of",
    "from_timm",
    "from_transformers",
    "list_models",
    "load",
    "parameter_masks",
    "read_header",
    "recalibrate_bn",
    "save",
    "save_pretrained",
    "save_transformers",
    "slice",
    "slice_file",
    "slice_to_transformers",
    "use_member",
]
