"""Several members' ONNX graphs as one graph whose weights are stored once.

Every tensor of a member is a prefix of the full member's tensor (per row block for fused
projections, :mod:`zoo.slicing`), and stays one through the exporter's rewrites (a transposed
linear weight is the transposed prefix: a prefix again, its chunks along the other axis). So each
member initializer is matched *by value* against the full member's initializers: where it equals
a prefix (or a per-chunk prefix) of one, the member's graph reads that initializer through
``Slice`` (``Reshape``, ``Slice``, ``Reshape`` for chunks); where it equals none (a member's own
batch-norm statistics, shape constants) it is kept, under the member's name prefix. Matching by
value is exact by construction: a member reads the same numbers as its standalone file.

Each member's nodes and values are renamed ``<key>/...``, and its output ``logits`` becomes
``logits.<key>``; the graph input ``input`` is shared (:func:`merge_members`: one output per
member). onnxruntime runs every node of a model whichever outputs are fetched
(``RunOptions.only_execute_path_to_fetches`` changed nothing: measured, one output of a
four-member file cost as much as all four), so the file holds each member's nodes in the
``then`` branch of an ``If`` on the optional input ``member`` (:func:`selectable`): only the
chosen branch runs. onnxruntime folds the slices into constants when a session starts;
:mod:`export.onnx_prune` gives a session one member's branch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

SHARED_MIN_ELEMENTS = 16  # smaller tensors are kept per member: a Slice would cost more than it saves


def member_output(key: str, output: str = "logits") -> str:
    """The family graph's output of one member."""
    return f"{output}.{key}"


@dataclass
class _Slice:
    """How a member tensor is read from a full one: ``source`` (its name), the chunk axis and count."""

    source: str
    chunk_axis: int | None = None
    chunks: int = 1


class _SharedTensors:
    """The full member's initializers, indexed by (rank, dtype, first element) for matching."""

    def __init__(self, initializers: list[onnx.TensorProto]):
        self.arrays = {t.name: numpy_helper.to_array(t) for t in initializers}
        self._index: dict[tuple, list[str]] = {}
        for name, array in self.arrays.items():
            self._index.setdefault(self._signature(array), []).append(name)

    @staticmethod
    def _signature(array: np.ndarray) -> tuple:
        return (array.ndim, array.dtype.str, array.reshape(-1)[:1].tobytes())

    def find(self, name: str, array: np.ndarray, chunk_counts: tuple[int, ...]) -> _Slice | None:
        """The full tensor ``array`` is a prefix of (the same name first), or None."""
        if array.size < SHARED_MIN_ELEMENTS or not np.issubdtype(array.dtype, np.floating):
            return None
        candidates = self._index.get(self._signature(array), [])
        for source in sorted(candidates, key=lambda c: c != name):
            found = _prefix_of(self.arrays[source], array, chunk_counts)
            if found is not None:
                return _Slice(source, *found)
        return None


def _prefix_of(full: np.ndarray, part: np.ndarray, chunk_counts: tuple[int, ...]) -> tuple | None:
    """(chunk axis, chunks) when ``part`` is ``full``'s prefix, plain (None, 1) or per chunk."""
    if full.shape == part.shape:
        return (None, 1) if np.array_equal(full, part) else None
    if any(p > f for p, f in zip(part.shape, full.shape)):
        return None
    if np.array_equal(full[tuple(slice(0, n) for n in part.shape)], part):
        return None, 1
    for axis, (f, p) in enumerate(zip(full.shape, part.shape)):
        for chunks in chunk_counts:
            if chunks > 1 and f != p and f % chunks == 0 and p % chunks == 0:
                if np.array_equal(_chunked_prefix(full, part.shape, axis, chunks), part):
                    return axis, chunks
    return None


def _chunked_prefix(full: np.ndarray, shape: tuple, axis: int, chunks: int) -> np.ndarray:
    split = full.reshape(*full.shape[:axis], chunks, full.shape[axis] // chunks, *full.shape[axis + 1 :])
    index = [slice(0, n) for n in shape]
    index[axis : axis + 1] = [slice(None), slice(0, shape[axis] // chunks)]
    return split[tuple(index)].reshape(shape)


def _constant(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _slice_nodes(target: str, how: _Slice, full_shape: tuple, shape: tuple) -> tuple[list, list]:
    """Nodes (and their int64 constants) computing ``target`` of ``shape`` from ``how.source`` (a
    strict prefix: an equal tensor is read under the source's name)."""
    source, constants, nodes = how.source, [], []
    dims, sizes = list(full_shape), list(shape)
    if how.chunk_axis is not None:
        a, c = how.chunk_axis, how.chunks
        dims[a : a + 1], sizes[a : a + 1] = [c, dims[a] // c], [c, sizes[a] // c]
        constants.append(_constant(f"{target}:split", dims))
        nodes.append(helper.make_node("Reshape", [source, f"{target}:split"], [f"{target}:chunks"]))
        source = f"{target}:chunks"
    axes = [i for i, (d, s) in enumerate(zip(dims, sizes)) if d != s]
    constants += [
        _constant(f"{target}:starts", [0] * len(axes)),
        _constant(f"{target}:ends", [sizes[i] for i in axes]),
        _constant(f"{target}:axes", axes),
    ]
    sliced = target if how.chunk_axis is None else f"{target}:prefix"
    nodes.append(helper.make_node("Slice", [source, f"{target}:starts", f"{target}:ends", f"{target}:axes"], [sliced]))
    if how.chunk_axis is not None:
        constants.append(_constant(f"{target}:shape", list(shape)))
        nodes.append(helper.make_node("Reshape", [sliced, f"{target}:shape"], [target]))
    for i, node in enumerate(nodes):
        node.name = f"{target}:slice{i}"
    return nodes, constants


@dataclass
class MemberGraph:
    """One member's exported graph and the name its output takes in the family graph."""

    key: str
    proto: onnx.ModelProto


def _renamed(graph: onnx.GraphProto, prefix: str, output: str) -> dict[str, str]:
    """Names of the member's values in the family graph (graph inputs unchanged)."""
    names = {i.name: i.name for i in graph.input}
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"a family file cannot hold a graph with control flow ({node.op_type} {node.name})")
        for value in (*node.input, *node.output):
            names.setdefault(value, f"{prefix}/{value}" if value else value)
    for value in graph.output:
        names[value.name] = member_output(prefix, value.name) if value.name == output else f"{prefix}/{value.name}"
    return names


def _add_member(family: onnx.GraphProto, member: MemberGraph, shared: _SharedTensors, chunk_counts) -> dict:
    """Append one member's nodes to ``family``; returns its counts of shared and own tensors."""
    graph = member.proto.graph
    names = _renamed(graph, member.key, "logits")
    counts = {"shared": 0, "own": 0}
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        target = names.setdefault(tensor.name, f"{member.key}/{tensor.name}")
        how = shared.find(tensor.name, array, chunk_counts)
        if how is not None and shared.arrays[how.source].shape == array.shape:
            names[tensor.name] = how.source  # the whole tensor: read it directly, as the standalone file does
            counts["shared"] += 1
            continue
        if how is None:
            family.initializer.append(numpy_helper.from_array(array, target))
            counts["own"] += 1
            continue
        nodes, constants = _slice_nodes(target, how, shared.arrays[how.source].shape, array.shape)
        family.node.extend(nodes)
        family.initializer.extend(constants)
        counts["shared"] += 1
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [names[i] if i else i for i in node.input]
        copy.output[:] = [names[o] if o else o for o in node.output]
        copy.name = f"{member.key}/{node.name or node.output[0]}"
        del copy.metadata_props[:]  # the exporter's provenance of each node: kilobytes per node, per member
        copy.doc_string = ""
        family.node.append(copy)
    for value in graph.value_info:
        if value.name in names:
            family.value_info.append(helper.make_value_info(names[value.name], value.type))
    for value in graph.output:
        family.output.append(helper.make_value_info(names[value.name], value.type))
    return counts


def merge_members(full: onnx.ModelProto, members: list[MemberGraph], chunk_counts: tuple[int, ...]) -> tuple:
    """One model: ``full``'s initializers (stored once) and every member's graph reading them.

    ``full`` is the largest member's export (it may also be one of ``members``); ``chunk_counts``
    the fused-projection row blocks of the family (``(1, 3)`` for QKV). Returns the model and,
    per member key, how many of its tensors are shared and how many it keeps."""
    shared = _SharedTensors(list(full.graph.initializer))
    graph = helper.make_graph([], "zoo_family", list(full.graph.input), [])
    graph.initializer.extend(full.graph.initializer)
    inputs = [(i.name, i.type.SerializeToString()) for i in full.graph.input]
    counts = {}
    for member in members:
        if [(i.name, i.type.SerializeToString()) for i in member.proto.graph.input] != inputs:
            raise ValueError(f"member {member.key} takes other inputs than the full member; they cannot share a file")
        counts[member.key] = _add_member(graph, member, shared, chunk_counts)
    read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in read]  # the full member's tensors no member reads
    del graph.initializer[:]
    graph.initializer.extend(kept)
    model = helper.make_model(graph, opset_imports=list(full.opset_import), ir_version=full.ir_version)
    return model, counts


MEMBER_INPUT = "member"


def _branch(graph: onnx.GraphProto, output: onnx.ValueInfoProto, name: str) -> onnx.GraphProto:
    """The nodes ``output`` needs, as a subgraph reading the outer graph's inputs and initializers."""
    needed, kept = {output.name}, []
    for node in reversed(graph.node):  # stored in topological order
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    return helper.make_graph(kept[::-1], name, [], [output])


def selectable(flat: onnx.ModelProto, default: int) -> onnx.ModelProto:
    """``flat`` (one output ``logits.<key>`` per member) as one output ``logits`` of the member that
    the optional int64 input ``member`` (default ``default``) numbers, in the order of the outputs.

    Member k's nodes are the ``then`` branch of ``If`` node ``member:<key>`` on ``member == k``
    (whose ``else`` branch gives no rows); the ``If`` outputs are concatenated."""
    graph = flat.graph
    nodes, selected, constants = [], [], [numpy_helper.from_array(np.array(default, np.int64), MEMBER_INPUT)]
    for index, output in enumerate(graph.output):
        key = output.name.split(".", 1)[1]
        classes = output.type.tensor_type.shape.dim[1].dim_value
        none = helper.make_node(
            "Constant", [], [f"{key}:none"], value=numpy_helper.from_array(np.zeros((0, classes), np.float32))
        )
        no_rows = helper.make_graph(
            [none],
            f"{key}:else",
            [],
            [helper.make_tensor_value_info(f"{key}:none", output.type.tensor_type.elem_type, [0, classes])],
        )
        constants.append(numpy_helper.from_array(np.array(index, np.int64), f"{key}:index"))
        nodes.append(helper.make_node("Equal", [MEMBER_INPUT, f"{key}:index"], [f"{key}:chosen"]))
        nodes.append(
            helper.make_node(
                "If", [f"{key}:chosen"], [f"{key}:rows"], name=f"member:{key}",
                then_branch=_branch(graph, output, f"{key}:then"), else_branch=no_rows,
            )
        )  # fmt: skip
        selected.append(f"{key}:rows")
    nodes.append(helper.make_node("Concat", selected, ["logits"], axis=0, name="logits"))
    logits = onnx.ValueInfoProto()
    logits.CopyFrom(graph.output[0])
    logits.name = "logits"
    member = helper.make_tensor_value_info(MEMBER_INPUT, onnx.TensorProto.INT64, [])
    joined = helper.make_graph(
        nodes, graph.name, [*graph.input, member], [logits], initializer=[*graph.initializer, *constants]
    )
    return helper.make_model(joined, opset_imports=list(flat.opset_import), ir_version=flat.ir_version)
