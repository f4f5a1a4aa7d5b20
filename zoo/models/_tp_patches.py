"""Torch-Pruning's dependency graph, read as zoo needs it.

zoo only *reads* Torch-Pruning's ``DependencyGraph`` (which axes a group couples); where that
reading fails on a timm model (a division by a count of 0, a lookup past a split's last piece,
a group search that does not end), these patches leave the channels in question unmapped or the
root whole, and ``ChannelPlan`` then checks what stays elastic like any other group. ``install``
puts them in Torch-Pruning's modules once per process; a Torch-Pruning pruner beside zoo gets
the same answers wherever Torch-Pruning's own code would not have failed, and no bound on its
searches.
"""

from __future__ import annotations


def install() -> None:
    """Once per process: Torch-Pruning looks its module functions up at call time."""
    from torch_pruning.dependency import index_mapping

    if getattr(index_mapping.update_concat_index_mapping, "zoo", False):
        return
    index_mapping.update_concat_index_mapping = _concat_mapping(index_mapping.update_concat_index_mapping)
    index_mapping.update_index_mapping = _mapped_once(index_mapping.update_index_mapping)
    index_mapping.update_expand_index_mapping = _expand_mapping(index_mapping.update_expand_index_mapping)
    index_mapping.update_reshape_index_mapping = _reshape_mapping(index_mapping.update_reshape_index_mapping)
    index_mapping.update_split_index_mapping = _split_mapping(index_mapping.update_split_index_mapping)
    _index_groups()


def _concat_mapping(original):
    """Torch-Pruning's concatenation mapping, except for a concatenation one of whose inputs has
    no channel count it can infer (a space-to-depth stem of image slices): Torch-Pruning maps
    none there when it cannot count the output either, and fails summing None when it can
    (``int + NoneType``); here such a concatenation gets no mapping in both cases. Nor does one
    whose counting reaches a split with more readers than pieces (Gemma 4's patch reshapes), where
    Torch-Pruning looks a piece up past the last one (``IndexError``, raised before it maps
    anything). Installed in Torch-Pruning's module, since every ``get_pruning_group`` maps the
    concatenations again."""
    from torch_pruning import ops
    from torch_pruning.dependency import shape_infer

    def update(graph, node) -> None:
        try:
            if node.type == ops.OPTYPE.CONCAT and node.module.concat_sizes is None:
                if any(shape_infer.infer_channels_between(graph, n, node) is None for n in node.inputs):
                    return
            original(graph, node)
        except IndexError:
            pass

    update.zoo = True
    return update


def _expand_mapping(original):
    """Torch-Pruning reads every five-axis ``expand`` as Hugging Face's grouped-query attention
    (key/value heads repeated) and maps its channels so; a five-axis expand of something else
    (GCViT's global query, Hiera's mask units) has fewer output channels than input ones, its
    "repeat" is 0 and every later mapping divides by it. Such an expand keeps its channels
    unmapped here; the groups through it are then checked like any other."""
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.constants import INDEX_MAPPING_PLACEHOLDER

    def update(graph, node) -> None:
        original(graph, node)
        for dep in [*node.dependencies, *(d for n in node.inputs for d in n.dependencies if d.target == node)]:
            mapping = dep.index_mapping[0]
            if isinstance(mapping, index_mapping._GQAIndexMapping) and mapping.repeat * mapping.head_dim < 1:
                dep.index_mapping[0] = INDEX_MAPPING_PLACEHOLDER

    return update


def _reshape_mapping(original):
    """Torch-Pruning maps a reshape between channel counts it infers on both sides, dividing the
    larger by the smaller; where one side counts 0 (it reaches the model's input through a
    residual, as SHViT's partial-channel attention does) the division fails before anything is
    mapped. Such a reshape keeps its channels unmapped; the groups through it are then checked
    like any other."""

    def update(graph, node) -> None:
        try:
            original(graph, node)
        except ZeroDivisionError:
            pass

    return update


def _split_mapping(original):
    """Torch-Pruning maps a split's i-th reader to its i-th piece, which holds only where every
    piece has one reader; where the readers outnumber the pieces (Sequencer's LSTM outputs) the
    pieces cannot be told apart and a reader past the last piece got an empty offset (an
    ``IndexError`` in every later search). Such a split keeps its channels unmapped; the groups
    through it are then checked like any other."""

    def update(graph, node) -> None:
        offsets = getattr(node.module, "offsets", None)
        if offsets is not None and len(node.outputs) > len(offsets) - 1:
            return
        original(graph, node)

    return update


GROUP_LIMIT = 20_000  # coupled operations in one group: legitimate groups hold hundreds
INDEX_LIMIT = 2_000_000  # indices it adds or flattens: Visformer's and EfficientViT's flattened maps multiply them
_BOUNDED = [False]  # inside one of zoo's group searches (``bounded``)
_INDICES = [0]  # indices the current search has added or flattened


class _Unbounded(Exception):
    """A group search past ``GROUP_LIMIT`` or ``INDEX_LIMIT``: Torch-Pruning's search on RexNet's
    partial residual adds grew one group to millions of operations (each seen with other indices)
    and did not end; on Visformer's attention, flattened maps multiplied the indices instead."""


def bounded(graph) -> list[str]:
    """Make the graph's group search give up past ``GROUP_LIMIT`` or ``INDEX_LIMIT``: the root it
    started from then couples nothing (no group: its channels stay whole). Returns the list those
    roots go to. Only while the groups are found (``unbound`` after): a later search starts from
    a root whose search ended, with fewer indices, and must never come back empty."""
    from torch_pruning.dependency.group import Group

    search, unbounded = graph.get_pruning_group, []

    def get_pruning_group(module, pruning_fn, idxs):
        _BOUNDED[0] = True  # only zoo's searches give up: a Torch-Pruning pruner beside them does not
        _INDICES[0] = 0
        try:
            return search(module, pruning_fn, idxs)
        except _Unbounded:
            unbounded.append(graph._module2name.get(module, "?"))
            return Group()
        finally:
            _BOUNDED[0] = False

    graph.get_pruning_group = get_pruning_group
    return unbounded


def unbound(graph) -> None:
    del graph.get_pruning_group  # the class's method again


def _index_groups() -> None:
    """Torch-Pruning's group search asks, for every dependency it reaches, whether the group
    already holds that operation with those indices, by comparing it with every item so far:
    quadratic in the group's size, with index lists compared element by element. On models whose
    groups reach many layers with many index sets (RexNet's partial residual adds) one search
    took over 15 minutes. Here each group also keeps a set of its (target, handler, indices), so
    the question is one lookup; the answers are the same. Adding and flattening (where one index
    becomes many) count the search's indices for its limits (``_spend``)."""
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.group import Group

    add_dep, has_pruning_op = Group.add_dep, Group.has_pruning_op
    flatten = index_mapping._FlattenIndexMapping.__call__

    def indexed_add_dep(self, dep, idxs) -> None:
        add_dep(self, dep, idxs)
        seen, added = self.__dict__.setdefault("zoo_seen", (set(), [0]))
        seen.add((dep.target, dep.handler, tuple(idxs)))
        added[0] += 1
        _spend(len(idxs), added[0] > GROUP_LIMIT)

    def indexed_has_pruning_op(self, dep, idxs) -> bool:
        seen, added = self.__dict__.get("zoo_seen", (None, [-1]))
        if added[0] != len(self._group):  # items set another way: Torch-Pruning's own scan
            return has_pruning_op(self, dep, idxs)
        return (dep.target, dep.handler, tuple(idxs)) in seen

    def counted_flatten(self, idxs):  # each index becomes ``stride`` ones: the work that grows
        mapped = flatten(self, idxs)
        _spend(len(mapped))
        return mapped

    Group.add_dep, Group.has_pruning_op = indexed_add_dep, indexed_has_pruning_op
    index_mapping._FlattenIndexMapping.__call__ = counted_flatten


def _spend(indices: int, past: bool = False) -> None:
    """Count a search's indices; inside zoo's searches, give up past either limit."""
    _INDICES[0] += indices
    if _BOUNDED[0] and (past or _INDICES[0] > INDEX_LIMIT):
        raise _Unbounded


def _mapped_once(original):
    """Torch-Pruning maps every concatenation, split and reshape again on each
    ``get_pruning_group``, since a pruner changes the traced modules between calls. zoo's graphs
    (``zoo_static``) are never pruned, so their mappings are made once: DenseNet's 120 groups,
    read a thousand times, spent minutes there. Other graphs (a Torch-Pruning pruner in the same
    process) are mapped as before."""

    def update(graph) -> None:
        if getattr(graph, "zoo_static", False):
            if getattr(graph, "zoo_mapped", False):
                return
            graph.zoo_mapped = True
        original(graph)

    return update
