"""Any timm image model as a nested family: its channel groups read from the dependency graph.

The family holds the timm model itself (``net``, at full size, or at one member's size when
sliced) and one elastic width per *channel group*: the output channels of a conv or linear layer
with every tensor axis coupled to them (its norm, the residual adds and every layer reading the
sum, a depthwise conv, a concatenation's slice of its reader). Torch-Pruning's
``DependencyGraph`` finds the groups (``zoo/models/_graph_plan.py``); a member keeps the first
channels of each group (a fraction per group; ``width`` is one fraction for all).

A member other than the largest runs its *skeleton*: the timm model pruned to the member's
sizes, kept on the meta device, run with ``torch.func.functional_call`` on index-selected parts
of the family's own tensors (prefix slices where the member's indices are a prefix). So a member
is computed by slicing weights, never by masking; gradients reach the shared tensors, and each
trained member keeps its own batch-norm statistics (``running_mean_<key>`` beside timm's norm's
parameters; ``running_mean`` names the active member's). ``zoo.slice`` builds the pruned timm
model for real (``max_member``), which is what export ships.

The hand-written families stay for the models they cover; ``zoo.from_timm`` takes this path for
every other timm model and refuses, naming the layer, what the graph cannot map.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call

from ..base import ElasticModel
from ..convert import UnsupportedModel, converts_any, supported
from ..registry import create_uninitialized
from ..space import DEFAULT_GRID, Dim, Member, Space, Values
from ._builder import build, register_family
from ._graph_plan import ChannelPlan, Index, UnmappableLayer, relative, take

_STAT = re.compile(r"^(?P<norm>.*)\.running_(?P<kind>mean|var)_(?P<key>[a-z0-9_]+)$")
_CACHED = 64  # member skeletons kept (a layerwise run draws a new member nearly every step)
_CACHED_PLANS = 4
_PLANS: OrderedDict[str, ChannelPlan] = OrderedDict()


def _timm(name: str, timm_args: dict, num_classes: int, in_chans: int) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_args)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as err:
        raise ValueError(f"timm cannot build {name} with {timm_args}: {str(err).splitlines()[0]}") from None


def _classifiers(model: nn.Module) -> list[nn.Module]:
    """The layers that write the logits (their outputs are the classes, never elastic)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    found = []
    for name in names:
        try:
            found.append(model.get_submodule(name))
        except AttributeError:
            continue
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module) and not any(head is f for f in found):
        found.append(head)
    return [m for f in found for m in f.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _plan(name: str, timm_args: dict, num_classes: int, in_chans: int, img_size: int) -> ChannelPlan:
    """The channel plan of a timm model, traced once per process (slicing and masks rebuild the
    family at other sizes; the plan does not change)."""
    key = json.dumps([name, timm_args, num_classes, in_chans, img_size], sort_keys=True)
    if key not in _PLANS:
        with torch.device("meta"):
            template = _timm(name, timm_args, num_classes, in_chans)
        example = torch.zeros(1, in_chans, img_size, img_size, device="meta")
        try:
            _PLANS[key] = ChannelPlan(template, example, _classifiers(template))
            _PLANS[key].constants = _constants(template, name, timm_args, num_classes, in_chans)
        except UnmappableLayer as err:
            raise UnmappableLayer(f"cannot make a family of {name}: {err}") from None
        except Exception as err:  # Torch-Pruning's own failure on a module it does not know
            raise UnmappableLayer(f"cannot make a family of {name}: {type(err).__name__}: {_first(err)}") from None
        while len(_PLANS) > _CACHED_PLANS:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return _PLANS[key]


def _constants(template: nn.Module, name: str, timm_args: dict, num_classes: int, in_chans: int) -> dict:
    """The values of the buffers timm computes and does not save (relative position indices):
    a family built on the meta device (loading, slicing) gets them from here."""
    names = [f"{m}.{b}" if m else b for m, mod in template.named_modules() for b in mod._non_persistent_buffers_set]
    if not names:
        return {}
    with torch.device("cpu"):
        buffers = dict(_timm(name, timm_args, num_classes, in_chans).named_buffers())
    return {n: buffers[n] for n in names if n in buffers}


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _divisor(channels: int, conv_groups: int = 1) -> int:
    """Counts round to multiples of 8 where the group allows (and keeps at least 4 steps), and
    always to multiples of its grouped convs' ``groups``."""
    both = math.lcm(8 if channels % 8 == 0 and channels >= 32 else 1, conv_groups)
    return both if channels % both == 0 and channels // both >= 4 else conv_groups


def _norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Batch norms with running statistics (each member keeps its own)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


class _Call(nn.Module):
    """Calls one method of a skeleton, so ``functional_call`` reaches ``forward_features`` too."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.inner, method)(*args, **kwargs)


class GraphFamily(ElasticModel):
    """A timm model whose every channel group is elastic (see the module docstring)."""

    input_kind = "image"

    def __init__(
        self,
        timm_model: str = "resnet10t",
        timm_args: dict | None = None,
        groups: list | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_members: Iterable[dict] = (),
    ):
        if low_rank:
            raise ValueError(f"{timm_model} as a graph family is dense: it has no low-rank form")
        timm_args = dict(timm_args or {})
        plan = _plan(timm_model, timm_args, num_classes, in_chans, img_size)
        template = plan.template
        found = [[g.root, g.channels] for g in plan.groups]
        if not found:
            raise UnmappableLayer(f"cannot make a family of {timm_model}: its graph has no channel group")
        if groups is not None and [list(g) for g in groups] != found:
            raise ValueError(f"{timm_model}'s channel groups differ from the recorded ones (another timm version?)")
        space = Space(group="group", groups=len(found), width_axes=("width",))
        super().__init__(space=space, widths=widths, ranks=ranks, max_member=max_member, extra_members=extra_members)
        self._plan = plan
        self.dims = [
            Dim(g.channels, divisor=_divisor(g.channels, need), group=i)
            for i, (g, need) in enumerate(zip(plan.groups, plan.conv_groups()))
        ]
        self._limit_keep = plan.keep(self._counts(self.max_values))
        net = _timm(timm_model, timm_args, num_classes, in_chans)
        if self.max_values != space.full():
            plan.prune(net, plan.removals(self._counts(self.max_values)))
        self.net = net
        self._skeletons: OrderedDict = OrderedDict()
        self._init_stats()
        self.num_classes, self.in_chans = num_classes, in_chans
        cfg = dict(getattr(template, "pretrained_cfg", None) or {})
        self.pretrained_cfg = {
            "mean": (0.5,) * in_chans,  # zoo's image default (``image_cfg``) where timm's cfg states none
            "std": (0.5,) * in_chans,
            **{k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct") if k in cfg},
            "input_size": (in_chans, img_size, img_size),
            "num_classes": num_classes,
            "first_conv": f"net.{cfg.get('first_conv', '')}",
            "classifier": f"net.{cfg.get('classifier', '')}",
        }
        self.model_args = {"timm_model": timm_model, "timm_args": timm_args, "groups": found}
        self._finish_init()

    # ----- members ---------------------------------------------------------------------
    def _counts(self, values: Values) -> list[int]:
        return [dim.count(values["width"][g]) for g, dim in enumerate(self.dims)]

    def _member(self, values: Values) -> tuple[nn.Module, dict[str, Index]]:
        """The skeleton of a member and its indices into ``net`` (cached, most recent last)."""
        key = tuple(values["width"])
        if key not in self._skeletons:
            counts = self._counts(values)
            skeleton = _Call(self._plan.skeleton(counts))
            for (_, norm), (_, mine) in zip(_norms(skeleton.inner), _norms(self.net)):
                norm.momentum, norm.eps = mine.momentum, mine.eps
            self._skeletons[key] = (skeleton, self._indices(values))
            while len(self._skeletons) > _CACHED:
                self._skeletons.popitem(last=False)
        self._skeletons.move_to_end(key)
        return self._skeletons[key]

    def set_member(self, member=None, rank=None, *, width=None, for_training: bool = False, **axes) -> Member:
        chosen = super().set_member(member, rank, width=width, for_training=for_training, **axes)
        self._alias(chosen.key)
        self._runner = None if self._active_values == self.max_values else self._member(self._active_values)
        return chosen

    def member_part(self, member: Member, name: str, source: torch.Tensor, shape, chunks: int) -> torch.Tensor:
        local = name.removeprefix("net.")
        if _STAT.match(local):
            return source
        index = self._indices(self.expand(member)).get(local)
        return take(source, index) if index else source

    def _indices(self, values: Values) -> dict[str, Index]:
        """A member's indices into ``net`` (the last member's kept: slicing asks once per tensor)."""
        key = tuple(values["width"])
        if getattr(self, "_last_indices", (None,))[0] != key:
            self._last_indices = (key, relative(self._plan.keep(self._counts(values)), self._limit_keep))
        return self._last_indices[1]

    # ----- batch-norm statistics per member ---------------------------------------------
    def _init_stats(self) -> None:
        self._norm_names = [n for n, _ in _norms(self.net)]
        limit = self.largest
        for name, norm in _norms(self.net):
            for kind in ("mean", "var"):
                tensor = norm._buffers.pop(f"running_{kind}")
                if limit in self.members:
                    norm.register_buffer(f"running_{kind}_{limit.key}", tensor)
        for member in self.members:
            if member != limit:
                self.reset_stats(member.key, self.expand(member))

    def reset_stats(self, key: str, values: Values) -> None:
        keep = self._plan.keep(self._counts(values))
        for name, norm in _norms(self.net):
            like = norm.weight if norm.weight is not None else norm.num_batches_tracked
            for kind, fill in (("mean", 0.0), ("var", 1.0)):
                stat = f"{name}.running_{kind}"
                size = len(keep[stat][0]) if stat in keep else self._plan.shapes[stat][0]
                norm.register_buffer(f"running_{kind}_{key}", torch.full((size,), fill, device=like.device))
        if self.members:
            self._alias(self.active_member.key if hasattr(self, "_active") else key)

    def _alias(self, key: str) -> None:
        """``running_mean``/``running_var`` name the member's statistics (not saved; None without)."""
        for _, norm in _norms(self.net):
            for kind in ("mean", "var"):
                norm._buffers.pop(f"running_{kind}", None)
                norm.register_buffer(f"running_{kind}", getattr(norm, f"running_{kind}_{key}", None), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if hasattr(self, "_active"):
            self._alias(self._active.key)  # ``.to()`` converts the two names separately: one tensor again
            self._restore_constants()
        return self

    @torch.no_grad()
    def _restore_constants(self) -> None:
        """Unsaved buffers timm computes (``to_empty`` leaves them garbage): their values again."""
        for name, value in getattr(self._plan, "constants", {}).items():
            buffer = self.net.get_buffer(name)
            if buffer is not None and buffer.shape == value.shape and buffer.device.type != "meta":
                buffer.copy_(value)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if hasattr(self, "_active"):
            self._alias(self._active.key)

    @property
    def uses_batchnorm(self) -> bool:
        return bool(self._norm_names)

    def norm_layers(self) -> list[nn.Module]:
        skeletons = [norm for skeleton, _ in self._skeletons.values() for _, norm in _norms(skeleton.inner)]
        return [norm for _, norm in _norms(self.net)] + skeletons

    # ----- running ---------------------------------------------------------------------
    def _tensors(self, index: dict[str, Index]) -> dict[str, torch.Tensor]:
        """The active member's tensors under the skeleton's names: parts of ``net``'s, its statistics."""
        key = self.active_member.key
        tensors = {}
        for name, tensor in [*self.net.named_parameters(), *self.net.named_buffers()]:
            stat = _STAT.match(name)
            if stat is None:
                tensors[f"inner.{name}"] = take(tensor, index[name]) if name in index else tensor
            elif stat["key"] == key:
                tensors[f"inner.{stat['norm']}.running_{stat['kind']}"] = tensor
        if key not in {m.key for m in self.members}:  # a member without statistics trains on the batch's
            keep = self._plan.keep(self._counts(self._active_values))
            for name in self._norm_names:
                for kind, fill in (("mean", 0.0), ("var", 1.0)):
                    size = (
                        len(keep.get(f"{name}.running_{kind}", {0: []})[0])
                        or self._plan.shapes[f"{name}.running_{kind}"][0]
                    )
                    tensors[f"inner.{name}.running_{kind}"] = torch.full((size,), fill, device=tensor.device)
        return tensors

    def _call(self, method: str, *args, **kwargs):
        if self._runner is None:
            return getattr(self.net, method)(*args, **kwargs)
        skeleton, index = self._runner
        skeleton.train(self.training)
        return functional_call(skeleton, self._tensors(index), (method, *args), kwargs, strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("forward", x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("forward_features", x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._call("forward_head", x, pre_logits=pre_logits)

    @property
    def num_features(self) -> int:
        """Features of ``forward_head(..., pre_logits=True)`` at the active member."""
        head = self.net.get_classifier()
        name = next((n for n, m in self.net.named_modules() if m is head), None)
        if not isinstance(head, (nn.Linear, nn.Conv2d)) or name is None:
            return self.net.num_features
        index = self._runner[1].get(f"{name}.weight", {}) if self._runner else {}
        held = head.weight.shape[1]
        return index.get(1, held) if isinstance(index.get(1, held), int) else len(index[1])

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier: the family is rebuilt around it (its channel groups stay)."""
        args = {**self.model_args, "num_classes": num_classes, "max_member": self.largest.to_dict()}
        args.update(widths=[], ranks=[], extra_members=[m.to_dict() for m in self.members])
        fresh = type(self)(**{k: v for k, v in args.items() if k != "global_pool"})
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(_head_prefix(self.net))}
        fresh.load_state_dict(state, strict=False)
        self.net = fresh.net.to(next(self.parameters()).device).train(self.training)
        self._skeletons.clear()
        self._plan, self._limit_keep, self._last_indices = fresh._plan, fresh._limit_keep, (None,)
        self.num_classes = num_classes
        self.model_args["num_classes"] = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self.set_member(self.active_member, for_training=True)


# ----- conversion ------------------------------------------------------------------------------
@converts_any
def convert_graph(
    model: nn.Module, name: str, timm_args: dict, img_size: int, widths: list[float], order: str, batches
) -> GraphFamily:
    """A timm model no hand-written family takes, as a graph family: its weights copied (batch-norm
    statistics become the full member's), its channels ordered by importance."""
    args = dict(timm_model=name, timm_args=timm_args, num_classes=model.num_classes, img_size=img_size)
    args["in_chans"] = _in_chans(model)
    try:
        family = create_uninitialized("timm_graph", **args, widths=widths)
    except UnmappableLayer as err:
        raise UnsupportedModel(f"{err} (zoo converts {supported()}, and other models as graph families)") from None
    load_timm(family, model)
    unordered = reorder_channels(family, order, batches)
    family.fixed_groups = list(family._plan.fixed)  # zoo.convert records them
    family.unordered_groups = unordered
    return family


def _in_chans(model: nn.Module) -> int:
    chans = getattr(model, "in_chans", None)
    return int(chans) if chans else next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


@torch.no_grad()
def load_timm(family: GraphFamily, model: nn.Module) -> None:
    """Copy the timm model's tensors into the full family; other members' statistics start fresh."""
    key, norms = family.largest.key, set(family._norm_names)
    state = {}
    for name, tensor in model.state_dict().items():
        norm, _, leaf = name.rpartition(".")
        if norm in norms and leaf in ("running_mean", "running_var"):
            name = f"{name}_{key}"
        state[name] = tensor
    expected = family.net.state_dict()
    problems = [k for k in state if k not in expected or expected[k].shape != state[k].shape]
    if problems:
        raise UnsupportedModel(f"{family.model_args['timm_model']} does not rebuild from its name ({problems[0]})")
    family.net.load_state_dict(state, strict=False)
    for member in family.members:
        if member != family.largest:
            family.reset_stats(member.key, family.expand(member))


def channel_scores(family: GraphFamily, order: str, batches) -> list[torch.Tensor]:
    """Importance of every group's channels: ``weight``, the L2 norm of all the parameters
    coupled to a channel (normalised per tensor); ``activation``, the mean |output| of the group's
    root layer on the calibration batches."""
    plan = family._plan
    scores = [torch.zeros(g.channels) for g in plan.groups]
    if order == "weight":
        params = dict(family.net.named_parameters())
        for tname, axes in plan.slots.items():
            if tname not in params:
                continue
            tensor = params[tname].detach().float().cpu()
            for axis, (owner, channel) in axes.items():
                per_index = tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1).pow(2).sum(1)
                for g in owner.unique().tolist():
                    if g >= 0:
                        mine = owner == g
                        norms = (
                            torch.zeros(plan.groups[g].channels).index_add_(0, channel[mine], per_index[mine]).sqrt()
                        )
                        scores[g] += norms / norms.mean() if norms.mean() > 0 else norms
        return scores
    return _activation_scores(family, batches, scores)


@torch.no_grad()
def _activation_scores(family: GraphFamily, batches, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    def hook(g: int):
        def record(_module, _inputs, output):
            out = output.detach().float()
            out = out.movedim(1, -1) if out.dim() == 4 else out
            scores[g] += out.abs().reshape(-1, out.shape[-1]).mean(0).cpu()

        return record

    roots = [family.net.get_submodule(g.root) for g in family._plan.groups]
    handles = [root.register_forward_hook(hook(g)) for g, root in enumerate(roots)]
    was = family.training
    family.eval()
    try:
        for batch in batches:
            family(batch)
    finally:
        family.train(was)
        for handle in handles:
            handle.remove()
    return scores


@torch.no_grad()
def reorder_channels(family: GraphFamily, order: str, batches=None) -> list[str]:
    """Permute every group's channels, most important first, on every coupled axis, so that
    members are prefixes of the important channels. Each group's permutation is kept only if the
    full model still computes what it computed (a grouped convolution's inputs, for one, cannot
    move across its groups); returns the roots of the groups left in their order."""
    if order == "none":
        return []
    if family.max_values != family._space.full():
        raise ValueError("reorder the full family, before slicing it")
    orders = [torch.sort(s, descending=True, stable=True).indices for s in channel_scores(family, order, batches)]
    size = family.pretrained_cfg["input_size"]
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(next(family.parameters()).device)
    was = family.net.training
    family.net.eval()
    reference, kept_order = family.net(x), []

    def permute(groups: list[int]) -> None:
        """Permute ``groups`` together; where the model changes, each half on its own (most
        models keep every permutation: one try)."""
        some = [orders[g] if g in groups else torch.arange(len(o)) for g, o in enumerate(orders)]
        before = _permute(family, family._plan.permutation(some))
        if torch.allclose(family.net(x), reference, rtol=1e-4, atol=1e-5):
            return
        for tensor, value in before:
            tensor.copy_(value)
        if len(groups) == 1:
            kept_order.append(family._plan.groups[groups[0]].root)
            return
        permute(groups[: len(groups) // 2])
        permute(groups[len(groups) // 2 :])

    permute(list(range(len(orders))))
    kept_order.sort(key=[g.root for g in family._plan.groups].index)
    family.net.train(was)
    family._skeletons.clear()
    return kept_order


def _permute(family: GraphFamily, permutation: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Apply a permutation to ``net``'s tensors (the full member's statistics too); what they held."""
    key, before = family.largest.key, []
    for name, tensor in [*family.net.named_parameters(), *family.net.named_buffers()]:
        stat = _STAT.match(name)
        if stat is not None and stat["key"] != key:
            continue
        local = f"{stat['norm']}.running_{stat['kind']}" if stat else name
        if permutation.get(local):
            before.append((tensor, tensor.detach().clone()))
        for axis, perm in permutation.get(local, {}).items():
            tensor.copy_(tensor.index_select(axis, perm.to(tensor.device)))
    return before


def _head_prefix(net: nn.Module) -> str:
    head = net.get_classifier()
    return "net." + next(n for n, m in net.named_modules() if m is head) + "."


@register_family("graph", GraphFamily)
def timm_graph(pretrained: bool = False, **kwargs) -> GraphFamily:
    """Any timm image model (``timm_model=``) as a family of channel-group widths."""
    return build("timm_graph", pretrained, kwargs)
