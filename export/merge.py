"""Merging low-rank layers back into dense ones where the dense layer is cheaper.

A factorized ``m x n`` layer at rank ``r`` stores and computes ``r * (m + n)`` weights; the
dense layer ``m * n``. At ``r >= m * n / (m + n)`` the factorization saves nothing, so the
exported graph uses one dense layer with ``W = u @ v`` (exact up to float rounding): fewer
ops, fewer parameters. Lower ranks stay factorized. For a conv, ``n`` is ``in * k * k``; the
``k x k`` then ``1 x 1`` pair and the merged conv run on the same output grid, so the same
rule compares their FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo import ElasticModel
from zoo.layers import ElasticConv2d, ElasticLinear

LAYER_KINDS = {ElasticConv2d: "conv", ElasticLinear: "linear"}


def dense_is_cheaper(rank: int, rows: int, cols: int) -> bool:
    """True when a dense ``rows x cols`` matrix costs no more than its rank-``rank`` factors."""
    return rank * (rows + cols) >= rows * cols


@torch.no_grad()
def merge_low_rank(model: ElasticModel) -> dict[str, list[int]]:
    """Merge, in place, every low-rank layer whose dense form is cheaper.

    ``model`` must be a standalone member (``zoo.slice``), whose tensors are exactly its
    active sizes. Returns ``{"conv": [merged, total], "linear": [merged, total]}`` over the
    low-rank layers of each kind (kinds without low-rank layers are left out).
    """
    if model.active_member != model.largest:
        raise ValueError(
            f"merge_low_rank needs a sliced member (zoo.slice), not a family running {model.active_member}"
        )
    counts: dict[str, list[int]] = {}
    for module in model.modules():
        kind = LAYER_KINDS.get(type(module))
        if kind is None or not module.low_rank:
            continue
        u, v = module.u.flatten(1), module.v.flatten(1)  # (out, r), (r, in * k * k)
        tally = counts.setdefault(kind, [0, 0])
        tally[1] += 1
        if dense_is_cheaper(v.shape[0], u.shape[0], v.shape[1]):
            dense = (u.double() @ v.double()).to(u.dtype).reshape(u.shape[0], *module.v.shape[1:])
            del module.u, module.v
            module.weight = nn.Parameter(dense)
            module.low_rank = False
            tally[0] += 1
    return counts


def describe_merges(counts: dict[str, list[int]]) -> str:
    """``merged 12 of 20 low-rank layers (conv 12 of 18, linear 0 of 2)``, or ``no low-rank layers``."""
    if not counts:
        return "no low-rank layers"
    merged, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    kinds = ", ".join(f"{kind} {c[0]} of {c[1]}" for kind, c in sorted(counts.items()))
    return f"merged {merged} of {total} low-rank layers ({kinds})"
