"""Channel groups of any timm model, read from Torch-Pruning's dependency graph.

Torch-Pruning (``DependencyGraph``) traces a model once and knows, for every conv or linear
output, every tensor axis coupled to it: the norm that follows, the residual adds and each
layer that reads the sum, a depthwise conv with its input, a concatenation's offset in its
reader. zoo uses it to *find* the coupled axes, never to prune the family's weights:

* ``ChannelPlan.slots``: for every tensor axis the graph couples to a group, which group and
  which of the group's channels each index holds. It is found by pruning labelled copies of the
  coupled modules (each element holds its own flat index) with Torch-Pruning's own handlers, one
  bit of the channel number at a time, so no layer kind is special-cased here.
* a member keeps the first ``k`` channels of every group: its index along each axis follows from
  the slots; its skeleton (the model at the member's sizes, on the meta device) is the template
  pruned by the same handlers. Running the skeleton on the family's tensors, index-selected
  (prefix slices where the indices are a prefix), computes the member by slicing weights.
* ``permutation``: a new order of each group's channels on every coupled axis (importance
  ordering), which leaves the full model's function unchanged.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import _tp_patches
from ._tp_patches import bounded, install, unbound

_CPU = torch.device("cpu")  # index bookkeeping, whatever device a model is built on
Index = tuple  # per axis: an int (a prefix of that length) or a LongTensor of indices


class UnmappableLayer(ValueError):
    """A layer whose channels the dependency graph cannot map; the message names it."""

    layer: str = ""


def _at(layer: str, message: str) -> UnmappableLayer:
    err = UnmappableLayer(message)
    err.layer = layer
    return err


@dataclass(frozen=True)
class Group:
    """One elastic dimension: the output channels of ``root`` and everything coupled to them."""

    root: str
    channels: int


def _dependency_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, _, n=n: entered.append(n)) for n, m in model.named_modules()]
    hooks.append(model.register_forward_hook(lambda *_: entered.append(_TRACED)))
    install()
    training = model.training
    try:
        with torch.enable_grad(), warnings.catch_warnings():  # the graph is read from autograd's
            warnings.simplefilter("ignore")  # its note on bare parameters: it slices their last axis, as zoo wants
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        graph.zoo_static = True  # zoo never prunes the traced modules: their index mappings stay
        # Torch-Pruning traced in eval mode: timm's models that cache tensors in eval mode
        # (attention biases) drop them on train(), else copies of the model would fail (a traced
        # tensor is no graph leaf: it cannot be deep-copied)
        model.train(training)
    except Exception as err:  # the trace runs the model's own code: any failure is the model's
        if entered and entered[-1] is _TRACED:  # the model ran: Torch-Pruning's reading of the trace failed
            raise UnmappableLayer(f"its dependency graph cannot be built ({_first_line(err)})") from None
        where = f"the layer {entered[-1]}" if entered and entered[-1] else "the model"
        raise UnmappableLayer(f"{where} cannot be traced ({_first_line(err)})") from None
    finally:
        for hook in hooks:
            hook.remove()
    return graph


_TRACED = object()  # marks, among the layers entered, that the whole model ran


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


class ChannelPlan:
    """The channel groups of ``template`` (a timm model, usually on the meta device) and where
    each group's channels sit in every tensor."""

    def __init__(self, template: nn.Module, example: torch.Tensor, ignored: list[nn.Module]):
        self.template = template
        self.graph = _dependency_graph(template, example)
        self.shapes = {n: tuple(t.shape) for n, t in _tensors(template)}
        roots, unbounded = [], bounded(self.graph)
        for group in self.graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
            if not group.items:  # its search did not end
                continue
            dep, idxs = group.items[0]
            name = self.graph._module2name.get(dep.target.module)
            if name is not None and idxs:
                roots.append((Group(name, len(idxs)), dep.target.module, dep.handler))
        unbound(self.graph)
        self.groups = [g for g, _, _ in roots]
        self._roots = [(module, handler) for _, module, handler in roots]
        self.slots = self._find_slots()
        past = f"over {_tp_patches.GROUP_LIMIT} operations or {_tp_patches.INDEX_LIMIT} indices"
        self.fixed += [f"{root}: its group search did not end ({past})" for root in unbounded]
        self._settle(example)

    def _settle(self, example: torch.Tensor) -> None:
        """Check the half-width member; where it fails at a layer, the groups that write that
        layer's outputs (else all that touch it) stay at full width; where none is left there
        (the failing operation reads a group traced elsewhere: DPN's dual-path adds), the group
        whose full width lets the member run past that point is found by bisection. Until the
        member runs, or no group would be left (then the layer is refused)."""
        while True:
            try:
                self._check(example)
                return
            except UnmappableLayer as err:
                culprits = self._groups_at(err.layer) if getattr(err, "layer", None) else set()
                if not culprits:
                    culprits = self._culprit(example, getattr(err, "progress", -1))
                if not culprits or len(culprits) == len(self.groups):
                    raise
                self.fixed += [f"{self.groups[g].root}: {err}" for g in sorted(culprits)]
                self._drop(culprits)

    def _culprit(self, example: torch.Tensor, progress: int) -> set[int]:
        """The group k such that keeping groups 0..k whole lets the member run further than
        ``progress`` (layers entered) and keeping 0..k-1 does not; empty if none does."""

        def further(whole: int) -> bool:
            counts = [g.channels if i < whole else max(1, g.channels // 2) for i, g in enumerate(self.groups)]
            try:
                self._check(example, counts)
            except UnmappableLayer as err:
                return getattr(err, "progress", -1) > progress
            return True

        low, high = 0, len(self.groups)  # further(low) is False: the failure being settled
        if not further(high):
            return set()
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if further(middle) else (middle, high)
        return {high - 1}

    def _groups_at(self, layer: str) -> set[int]:
        writers, touching = set(), set()
        for tname, axes in self.slots.items():
            if tname != layer and not tname.startswith(layer + "."):
                continue
            for axis, (owner, _) in axes.items():
                groups = {g for g in owner.unique().tolist() if g >= 0}
                touching |= groups
                writers |= groups if axis == 0 else set()
        return writers or touching

    def _drop(self, groups: set[int]) -> None:
        kept = [g for g in range(len(self.groups)) if g not in groups]
        remap = torch.full((len(self.groups) + 1,), -1, dtype=torch.long, device=_CPU)  # the last: owner -1
        remap[kept] = torch.arange(len(kept), device=_CPU)
        self.groups, self._roots = [self.groups[g] for g in kept], [self._roots[g] for g in kept]
        for axes in self.slots.values():
            for axis, (owner, channel) in list(axes.items()):
                axes[axis] = (remap[owner], channel)

    def _check(self, example: torch.Tensor, counts: list[int] | None = None) -> None:
        """A member (by default at half of every group) must have the sizes the slots say and run
        (on the meta device: shapes only); else the layer where it fails is refused, with how
        many layers it entered (``progress``)."""
        counts = counts or [max(1, g.channels // 2) for g in self.groups]
        skeleton, keep = self.skeleton(counts), self.keep(counts)
        for name, tensor in _tensors(skeleton):
            expected = tuple(
                len(keep[name][a]) if a in keep.get(name, {}) else n for a, n in enumerate(self.shapes[name])
            )
            if tuple(tensor.shape) != expected:
                raise _at(name, f"the tensor {name} (pruned to {tuple(tensor.shape)}, its channels say {expected})")
        entered = []
        hooks = [m.register_forward_pre_hook(lambda m, _, n=n: entered.append(n)) for n, m in skeleton.named_modules()]
        try:
            with torch.no_grad():
                skeleton.eval()(example)
        except Exception as err:
            layer = entered[-1] if entered else ""
            failure = _at(layer, f"the layer {layer or '?'} ({_first_line(err)})")
            failure.progress = len(entered)
            raise failure from None
        finally:
            for hook in hooks:
                hook.remove()

    def conv_groups(self) -> list[int]:
        """Per group, the least common multiple of the ``groups`` of the grouped (not depthwise)
        convs whose outputs it holds: a member's count must be a multiple of it, else such a conv
        (RegNet's, ResNeXt's) cannot run. The meta device checks no such thing, so ``_check`` passes."""
        needs = [1] * len(self.groups)
        for name, module in self.template.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.in_channels:
                owner = self.slots.get(f"{name}.weight", {}).get(0, (None, None))[0]
                for g in [] if owner is None else owner.unique().tolist():
                    if g >= 0:
                        needs[g] = math.lcm(needs[g], module.groups)
        return needs

    def __deepcopy__(self, memo) -> "ChannelPlan":
        return self  # never changed after tracing (skeletons copy the template): copies of a family share it

    # ----- pruning through the graph's handlers --------------------------------------------
    def _operations(self, removals: dict[int, list[int]]) -> dict[tuple[str, object], set[int]]:
        """(target name, handler) -> positions to remove, for the channels ``removals`` gives per group."""
        ops: dict[tuple[str, object], set[int]] = {}
        for g, idxs in removals.items():
            if not idxs:
                continue
            module, handler = self._roots[g]
            for dep, positions in self.graph.get_pruning_group(module, handler, sorted(idxs)).items:
                target = dep.target.module
                if isinstance(target, nn.Parameter):  # an unwrapped parameter (layer scale, tokens)
                    name = self.graph._param_to_name.get(target)
                else:
                    name = self.graph._module2name.get(target)
                if name is None:  # an operation (add, concat, reshape): no tensor of its own
                    continue
                plain = [int(getattr(i, "idx", i)) for i in positions]
                key = (name, dep.handler, dep.target.pruning_dim)
                ops.setdefault(key, set()).update(plain)
        return ops

    def prune(self, model: nn.Module, removals: dict[int, list[int]]) -> nn.Module:
        """Prune ``model`` (the template's architecture, any device) in place: every group's
        ``removals``, positions in the unpruned model's coordinates, each handler called once."""
        for (name, handler, dim), positions in self._operations(removals).items():
            handler.__self__.pruning_dim = dim
            target = _get(model, name)
            try:
                with _CPU:  # handlers make index tensors on the default device
                    result = handler(target, sorted(positions))
            except Exception as err:
                raise _at(name, f"the layer {name} ({type(target).__name__}: {_first_line(err)})") from None
            if isinstance(target, nn.Parameter):
                _set(model, name, result)
        return model

    def _probe(self, removals: dict[int, list[int]]) -> dict[str, dict[int, torch.Tensor]]:
        """Which indices along which axes of which tensors disappear when ``removals`` are pruned:
        the coupled modules are copied with every element holding its own flat index."""
        removed: dict[str, dict[int, torch.Tensor]] = {}
        copies: dict[str, nn.Module] = {}
        for (name, handler, dim), positions in self._operations(removals).items():
            if name not in copies:
                copies[name] = _labelled(_get(self.template, name))
            handler.__self__.pruning_dim = dim
            try:
                with _CPU:
                    result = handler(copies[name], sorted(positions))
            except Exception as err:
                raise UnmappableLayer(f"the layer {name} ({type(copies[name]).__name__}: {_first_line(err)})") from None
            if isinstance(copies[name], nn.Parameter):
                copies[name] = result
        for name, module in copies.items():
            for tname, labels in _tensors(module, name):
                for axis, gone in _lost(labels, self.shapes[tname]).items():
                    removed.setdefault(tname, {})[axis] = gone
        return removed

    def _codes(self, g: int) -> dict[tuple[str, int], torch.Tensor]:
        """(tensor, axis) -> 1 + the channel of group ``g`` each index holds (0: none). Channel
        ``c`` is read from the probes that remove the channels whose number ``c + 1`` has bit b."""
        group = self.groups[g]
        codes: dict[tuple[str, int], torch.Tensor] = {}
        for bit in range(math.ceil(math.log2(group.channels + 1))):
            chosen = [c for c in range(group.channels) if (c + 1) >> bit & 1]
            for tname, axes in self._probe({g: chosen}).items():
                for axis, gone in axes.items():
                    size = self.shapes[tname][axis]
                    codes.setdefault((tname, axis), torch.zeros(size, dtype=torch.long, device=_CPU))[gone] += 1 << bit
        for (tname, axis), code in codes.items():
            counts = torch.bincount(code[code > 0], minlength=group.channels + 1)
            if len(counts) > group.channels + 1 or len(set(counts[1:].tolist())) != 1:
                raise UnmappableLayer(f"the tensor {tname} (an index of its axis {axis} holds several channels)")
        return codes

    def _find_slots(self) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """tensor -> axis -> (group of each index or -1, channel of each index). A group whose
        channels no index map describes (attention's fused q, k, v, whose heads are not units
        here) stays at full width: it is left out of the groups and recorded in ``fixed``."""
        found, self.fixed = [], []
        for g, group in enumerate(self.groups):
            try:
                found.append((group, self._roots[g], self._codes(g)))
            except UnmappableLayer as err:
                self.fixed.append(f"{group.root}: {err}")
        if not found:
            raise UnmappableLayer(f"no channel group maps ({self.fixed[0] if self.fixed else 'none found'})")
        self.groups, self._roots = [f[0] for f in found], [f[1] for f in found]
        slots: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for g, (_, _, codes) in enumerate(found):
            for (tname, axis), code in codes.items():
                owner, channel = slots.setdefault(tname, {}).setdefault(axis, _unowned(self.shapes[tname][axis]))
                mine = code > 0
                if bool((owner[mine] >= 0).any()):
                    raise UnmappableLayer(f"the tensor {tname} (two channel groups share its axis {axis})")
                owner[mine], channel[mine] = g, code[mine] - 1
        return slots

    # ----- members ---------------------------------------------------------------------
    def keep(self, counts: list[int]) -> dict[str, dict[int, torch.Tensor]]:
        """For every coupled tensor axis, the indices a member keeping ``counts[g]`` channels
        of each group holds (sorted)."""
        limits = torch.tensor([*counts, 1 << 62], device=_CPU)
        return {
            tname: {axis: torch.nonzero(channel < limits[owner]).flatten() for axis, (owner, channel) in axes.items()}
            for tname, axes in self.slots.items()
        }

    def removals(self, counts: list[int]) -> dict[int, list[int]]:
        return {g: list(range(n, group.channels)) for g, (group, n) in enumerate(zip(self.groups, counts))}

    def skeleton(self, counts: list[int]) -> nn.Module:
        """The template at a member's sizes, on the meta device (its tensors come from the family)."""
        model = copy.deepcopy(self.template).to("meta")
        return self.prune(model, self.removals(counts))

    def permutation(self, orders: list[torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
        """tensor -> axis -> the index permutation that puts each group's channels in ``orders[g]``
        (new channel j holds old channel ``orders[g][j]``) on every coupled axis."""
        out: dict[str, dict[int, torch.Tensor]] = {}
        for tname, axes in self.slots.items():
            for axis, (owner, channel) in axes.items():
                perm = torch.arange(len(owner), device=_CPU)
                for g in owner.unique().tolist():
                    if g < 0:
                        continue
                    where = torch.nonzero(owner == g).flatten()
                    ordered = where[torch.sort(channel[where] * len(owner) + where).indices]
                    per = len(ordered) // self.groups[g].channels
                    if per * self.groups[g].channels != len(ordered):
                        raise UnmappableLayer(f"the tensor {tname} (its channels are not all the same size)")
                    table = ordered.view(self.groups[g].channels, per)
                    perm[table.flatten()] = table[orders[g]].flatten()
                out.setdefault(tname, {})[axis] = perm
        return out


def relative(keep: dict[str, dict[int, torch.Tensor]], limit: dict[str, dict[int, torch.Tensor]]) -> dict[str, Index]:
    """A member's indices into a model that holds the member ``limit`` (prefix lengths where they
    are prefixes)."""
    out = {}
    for tname, axes in keep.items():
        index = {}
        for axis, kept in axes.items():
            held = limit[tname][axis]
            rel = torch.searchsorted(held, kept)
            index[axis] = len(rel) if torch.equal(rel, torch.arange(len(rel), device=_CPU)) else rel
        if any(not isinstance(i, int) or i != len(limit[tname][a]) for a, i in index.items()):
            out[tname] = index
    return out


def take(tensor: torch.Tensor, index: dict[int, object]) -> torch.Tensor:
    """The member's part of ``tensor``: a prefix (narrow, a view) or an index selection per axis."""
    for axis, i in index.items():
        tensor = tensor.narrow(axis, 0, i) if isinstance(i, int) else tensor.index_select(axis, i.to(tensor.device))
    return tensor


def _unowned(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((size,), -1, dtype=torch.long, device=_CPU), torch.zeros(size, dtype=torch.long, device=_CPU)


def _tensors(module: nn.Module, prefix: str = ""):
    """(name, tensor) of every parameter and buffer, or of a bare parameter."""
    if isinstance(module, torch.Tensor):
        yield prefix, module
        return
    seen = set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            yield (f"{prefix}.{name}" if prefix else name), t


def _labelled(module):
    """A CPU copy of ``module`` (or of a parameter) whose every element holds its flat index."""

    def label(t: torch.Tensor) -> torch.Tensor:
        return torch.arange(t.numel(), dtype=torch.float64, device=_CPU).reshape(t.shape)

    if isinstance(module, torch.Tensor):
        return nn.Parameter(label(module), requires_grad=False)
    out = copy.deepcopy(module)
    for sub in out.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(label(p), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = label(b)
    return out


def _lost(labels: torch.Tensor, shape: tuple) -> dict[int, torch.Tensor]:
    """Per axis, the indices of the original ``shape`` that the pruned ``labels`` no longer hold.
    Handlers select whole slices, so one line along each axis tells which indices it kept."""
    lost = {}
    if labels.numel() == 0:
        return {a: torch.arange(shape[a], device=_CPU) for a, n in enumerate(labels.shape) if n == 0}
    stride = 1
    for axis in reversed(range(len(shape))):
        line = labels.detach()[tuple(slice(None) if d == axis else 0 for d in range(labels.dim()))]
        kept = torch.zeros(shape[axis], dtype=torch.bool, device=_CPU)
        kept[(line.to(torch.long) // stride) % shape[axis]] = True
        if not bool(kept.all()):
            lost[axis] = torch.nonzero(~kept).flatten()
        stride *= shape[axis]
    return lost


def _get(model: nn.Module, name: str):
    owner, _, leaf = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    return getattr(parent, leaf) if isinstance(getattr(parent, leaf, None), nn.Parameter) else model.get_submodule(name)


def _set(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, value)
