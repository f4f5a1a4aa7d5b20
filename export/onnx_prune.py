"""One member of a family file as a model of its own, cut from the protobuf wire format
(standard library only, so ``export.runtime`` stays free of the onnx package).

A family file (:mod:`export.family_graph`) holds each member's nodes in the ``then`` branch of
an ``If`` node. onnxruntime optimizes every branch when a session starts: its constant folding
would materialise every member's sliced weights. The runtime therefore hands onnxruntime the
chosen member's branch as the main graph, with the outer initializers and inputs it reads. The
bytes of kept fields are copied unchanged; only the graph message is rebuilt. Field numbers are
those of onnx.proto (ModelProto.graph 7; GraphProto node 1, name 2, initializer 5, input 11,
output 12, value_info 13; NodeProto input 1, name 3, attribute 5; TensorProto and ValueInfoProto
name 8 and 1).
"""

from __future__ import annotations

from .onnx_header import _Corrupt, _varint

_GRAPH = 7
_NODE, _INITIALIZER, _INPUT, _OUTPUT, _VALUE_INFO = 1, 5, 11, 12, 13
_NAMED = {_INITIALIZER: 8, _INPUT: 1, _OUTPUT: 1, _VALUE_INFO: 1}  # field holding the name


def _spans(buf: bytes, start: int, end: int):
    """(field number, wire type, payload span, whole-field span) of one message."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            payload = None
        elif wire in (1, 5):
            pos, payload = pos + (8 if wire == 1 else 4), None
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            payload, pos = (pos, pos + length), pos + length
        else:
            raise _Corrupt
        if pos > end or number == 0:
            raise _Corrupt
        yield number, wire, payload, (first, pos)


def _strings(buf: bytes, span: tuple[int, int], number: int) -> list[str]:
    return [bytes(buf[p[0] : p[1]]).decode("utf-8") for n, w, p, _ in _spans(buf, *span) if n == number and w == 2]


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _name(buf: bytes, span: tuple[int, int], number: int) -> str:
    return (_strings(buf, span, number) or [""])[0]


def _branch_of(buf: bytes, graph: list, node_name: str) -> tuple[int, int]:
    """The ``then_branch`` graph of the graph's node ``node_name`` (NodeProto name 3, attribute 5;
    AttributeProto name 1, g 6)."""
    for number, wire, payload, _ in graph:
        if number == _NODE and wire == 2 and _name(buf, payload, 3) == node_name:
            for n, w, attribute, _ in _spans(buf, *payload):
                if n == 5 and w == 2 and _name(buf, attribute, 1) == "then_branch":
                    return next(p for k, kw, p, _ in _spans(buf, *attribute) if k == 6 and kw == 2)
    raise ValueError(f"the model has no member node {node_name!r}")


def _member_graph(buf: bytes, graph_span: tuple[int, int], node_name: str) -> tuple[bytes, str]:
    """A graph of the branch's nodes, the outer initializers and inputs they read, its output."""
    graph = list(_spans(buf, *graph_span))
    branch = list(_spans(buf, *_branch_of(buf, graph, node_name)))
    read = {name for n, w, p, _ in branch if n == _NODE and w == 2 for name in _strings(buf, p, 1)}
    outputs = [_name(buf, p, 1) for n, w, p, _ in branch if n == _OUTPUT and w == 2]
    parts = [buf[a:b] for n, w, _, (a, b) in branch if n in (_NODE, _INITIALIZER, _OUTPUT, _VALUE_INFO)]
    for number, wire, payload, (a, b) in graph:
        if wire == 2 and number in (_INITIALIZER, _INPUT) and _name(buf, payload, _NAMED[number]) in read:
            parts.append(buf[a:b])
        elif number == 2:  # the graph's name
            parts.append(buf[a:b])
    return b"".join(parts), outputs[0]


def member_model(model: bytes | memoryview, node_name: str) -> tuple[bytes, str]:
    """The model (ModelProto bytes) that runs the ``then`` branch of ``If`` node ``node_name`` of
    ``model`` on its own, and the name of its output. Kept fields are referenced, not copied, until
    the one result is joined: many freed copies of mid-sized tensors would stay in the process's
    heap (measured: a 100 MB file's 25 MB member took 142 MB that way)."""
    model = memoryview(model)
    try:
        parts, output = [], None
        for number, wire, payload, whole in _spans(model, 0, len(model)):
            if number == _GRAPH and wire == 2:
                graph, output = _member_graph(model, payload, node_name)
                parts.append(_encode_varint(_GRAPH << 3 | 2) + _encode_varint(len(graph)) + graph)
            else:
                parts.append(model[whole[0] : whole[1]])
    except (_Corrupt, UnicodeDecodeError, IndexError, StopIteration):
        raise ValueError("not a readable ONNX model") from None
    if output is None:
        raise ValueError("not a readable ONNX model (no graph)")
    return b"".join(parts), output
