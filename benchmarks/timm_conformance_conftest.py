"""conftest.py for timm's own tests/test_models.py: registers zoo's families with timm and picks
the member every zoo model that the tests create runs.

``ZOO_MEMBER`` (JSON, set by ``benchmarks/timm_conformance.py``) says which one:

* unset or ``{}``: the family as built, running its largest trained member;
* ``{"width": 0.5}`` (any member): the family, switched to that trained member with
  ``set_member`` right after it is built, as a user would (the features_only backbone too);
* ``{"low_rank": true, "member": {...}}``: the same, on the family built with ``low_rank=True``
  (the shipped weights are dense: with them, the member without its rank);
* ``{"sliced": "smallest"}``: the architecture of a sliced member, the family's smallest
  layerwise member (narrowest, shallowest), built with the arguments ``zoo.slice`` builds it
  with (``max_member=...``). Built with pretrained weights, it is ``zoo.slice`` of the shipped
  family at width 0.5 (a trained member: the smallest layerwise one has no batch-norm
  statistics).

Only the entrypoints of zoo's models are wrapped; the tests, their filters and timm are as
timm ships them, apart from the lines ``timm_conformance.py`` adds to timm's per-kind lists.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from timm.models import _registry

import zoo
from zoo.features import features_only

CONFIG = json.loads(os.environ.get("ZOO_MEMBER") or "{}")
FEATURES = ("features_only", "out_indices", "feature_cls")


@functools.lru_cache(maxsize=None)
def _smallest(name: str) -> dict:
    with torch.device("meta"):
        return zoo.create_model(name).smallest_member(layerwise=True).to_dict()


def _wrap(name: str, entrypoint):
    @functools.wraps(entrypoint)
    def at_member(pretrained: bool = False, **kwargs):
        if CONFIG.get("sliced"):
            if pretrained:
                features = {k: kwargs.pop(k) for k in FEATURES if k in kwargs}
                model = zoo.slice(entrypoint(pretrained=True, **kwargs), width=0.5)
                return (
                    features_only(model, features.get("out_indices"), features.get("feature_cls"))
                    if features.pop("features_only", False)
                    else model
                )
            member = _smallest(name)
            kwargs.update(max_member=member, widths=[], ranks=[], extra_members=[member])
            return entrypoint(pretrained=False, **kwargs)
        member = dict(CONFIG.get("member", {k: v for k, v in CONFIG.items() if k != "low_rank"}))
        if CONFIG.get("low_rank"):
            if pretrained:  # the shipped image families are dense: their member at that width
                member.pop("rank", None)
            else:
                kwargs.setdefault("low_rank", True)
        model = entrypoint(pretrained=pretrained, **kwargs)
        if member:
            model.set_member(member)
        return model

    return at_member


for _name in zoo.list_models():
    if _name in _registry._model_entrypoints:  # zoo's image families (the GPTs are zoo's only)
        _registry._model_entrypoints[_name] = _wrap(_name, _registry._model_entrypoints[_name])
