"""One output's part of an ONNX model, cut from the protobuf wire format (standard library only).

A family file (:mod:`export.family_graph`) holds every member's graph. onnxruntime keeps and
optimizes every node of a model, whichever outputs a run asks for: its constant folding would
materialise every member's sliced weights. The runtime therefore hands onnxruntime the chosen
member's part only: the nodes its output needs, the initializers and inputs they read, that
output. The bytes of kept fields are copied unchanged; only the graph message is rebuilt.
Field numbers are those of onnx.proto (ModelProto.graph 7; GraphProto node 1, initializer 5,
input 11, output 12, value_info 13; NodeProto input 1, output 2;
TensorProto and ValueInfoProto name 8 and 1).
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


def _graph_for(buf: bytes, graph: tuple[int, int], output: str) -> bytes:
    """The graph message holding only what ``output`` needs."""
    fields = list(_spans(buf, *graph))
    outputs = [_strings(buf, p, 1)[0] for n, w, p, _ in fields if n == _OUTPUT and w == 2]
    if output not in outputs:
        raise ValueError(f"the model has no output {output!r} (it has {', '.join(outputs)})")
    needed, kept_nodes = {output}, set()
    nodes = [(i, f) for i, f in enumerate(fields) if f[0] == _NODE and f[1] == 2]
    for index, (_, _, payload, _) in reversed(nodes):  # nodes are stored in topological order
        if needed.intersection(_strings(buf, payload, 2)):
            kept_nodes.add(index)
            needed.update(_strings(buf, payload, 1))
    parts = []
    for index, (number, wire, payload, whole) in enumerate(fields):
        if wire == 2 and number == _NODE:
            keep = index in kept_nodes
        elif wire == 2 and number in _NAMED:
            name = (_strings(buf, payload, _NAMED[number]) or [""])[0]
            keep = name == output if number == _OUTPUT else name in needed
        else:
            keep = True
        if keep:
            parts.append(buf[whole[0] : whole[1]])
    return b"".join(parts)


def prune_to_output(model: bytes, output: str) -> bytes:
    """``model`` (ModelProto bytes) reduced to the part that computes ``output``."""
    try:
        parts = []
        for number, wire, payload, whole in _spans(model, 0, len(model)):
            if number == _GRAPH and wire == 2:
                graph = _graph_for(model, payload, output)
                parts.append(_encode_varint(_GRAPH << 3 | 2) + _encode_varint(len(graph)) + graph)
            else:
                parts.append(model[whole[0] : whole[1]])
    except (_Corrupt, UnicodeDecodeError, IndexError):
        raise ValueError("not a readable ONNX model") from None
    return b"".join(parts)
