"""What `zoo info` shows of an ONNX file, read from the protobuf wire format directly.

Importing ``onnx`` costs about 1.7 s (its ml_dtypes extension) and onnxruntime would build a
session; the few fields `zoo info` needs (producer, opsets, metadata, graph inputs and outputs)
sit in a handful of protobuf fields, so this module reads them with the standard library,
skipping nodes and weights without decoding them. Field numbers are those of onnx.proto.
The zoo record is checked against its declared schema (``zoo/schema.py``, loaded without
zoo's package, which imports torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

METADATA_KEY = "zoo"

# TensorProto.DataType -> numpy's name for it
ELEM_TYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "object",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
    16: "bfloat16",
}  # fmt: skip


class _Corrupt(Exception):
    pass


@dataclass
class ValueInfo:
    name: str
    elem_type: int = 0
    dims: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name} {ELEM_TYPES.get(self.elem_type, f'type {self.elem_type}')} [{', '.join(self.dims)}]"


@dataclass
class OnnxHeader:
    producer_name: str = ""
    producer_version: str = ""
    opsets: list[tuple[str, int]] = field(default_factory=list)  # (domain, version)
    metadata: dict[str, str] = field(default_factory=dict)
    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of one message; length-delimited values are (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise _Corrupt
        if pos > end:
            raise _Corrupt
        yield number, wire, value


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _text(buf, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8", errors="replace")


def _value_info(buf, span) -> ValueInfo:
    info = ValueInfo("")
    for number, wire, value in _fields(buf, *span):
        if number == 1 and wire == 2:
            info.name = _text(buf, value)
        elif number == 2 and wire == 2:  # TypeProto
            for n, w, tensor in _fields(buf, *value):
                if n != 1 or w != 2:  # only tensor_type
                    continue
                for m, mw, v in _fields(buf, *tensor):
                    if m == 1 and mw == 0:
                        info.elem_type = v
                    elif m == 2 and mw == 2:  # TensorShapeProto: repeated Dimension
                        for d, dw, dim in _fields(buf, *v):
                            if d == 1 and dw == 2:
                                info.dims.append(_dimension(buf, dim))
    return info


def _dimension(buf, span) -> str:
    text = "?"
    for number, wire, value in _fields(buf, *span):
        if number == 1 and wire == 0:
            text = str(value)
        elif number == 2 and wire == 2:
            text = _text(buf, value)
    return text


def read_onnx_header(path: str | os.PathLike) -> OnnxHeader:
    """Producer, opsets, metadata and graph inputs/outputs of an ONNX file (ValueError if it is
    not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    header = OnnxHeader()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, wire, value in _fields(buf, 0, len(buf)):
                if wire != 2:
                    continue
                if number == 2:
                    header.producer_name = _text(buf, value)
                elif number == 3:
                    header.producer_version = _text(buf, value)
                elif number == 8:  # OperatorSetIdProto
                    opset = dict((n, v) for n, w, v in _fields(buf, *value))
                    header.opsets.append((_text(buf, opset[1]) if 1 in opset else "", int(opset.get(2, 0))))
                elif number == 14:  # StringStringEntryProto
                    entry = {n: _text(buf, v) for n, w, v in _fields(buf, *value) if w == 2}
                    header.metadata[entry.get(1, "")] = entry.get(2, "")
                elif number == 7:  # GraphProto: inputs 11, outputs 12 (nodes and weights skipped)
                    for n, w, v in _fields(buf, *value):
                        if n in (11, 12) and w == 2:
                            (header.inputs if n == 11 else header.outputs).append(_value_info(buf, v))
    except (_Corrupt, ValueError, KeyError, TypeError):  # mmap of an empty file is a ValueError
        raise ValueError(f"{path} is not a readable ONNX file") from None
    if not header.opsets:
        raise ValueError(f"{path} is not a readable ONNX file (no opset)")
    return header


def zoo_record(header: OnnxHeader, path: str | os.PathLike) -> dict:
    """The zoo record of an exported file (ValueError for a foreign or corrupt one)."""
    return checked_record(header.metadata, path, runnable=False)


def checked_record(metadata: dict[str, str], path: str | os.PathLike, runnable: bool = True) -> dict:
    """The zoo record in an ONNX file's metadata, checked against its schema (``runnable``:
    with the input spec that running it needs); a ValueError naming the file otherwise."""
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is an ONNX file but not a zoo export (no 'zoo' metadata)")
    try:
        record = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise ValueError(f"{path} has corrupt zoo metadata (not JSON)") from None
    schema = _zoo_schema()
    return schema.check(record, schema.RUNNABLE_RECORD if runnable else schema.ONNX_RECORD, f"{path}: zoo metadata")


def _zoo_schema() -> ModuleType:
    """``zoo.schema`` (standard library only), loaded as ``cli.app.zoo_module`` loads it when zoo's
    package (torch, timm) is not imported: `zoo info` and ``export.runtime`` stay light."""
    if "zoo" in sys.modules:
        return importlib.import_module("zoo.schema")
    if "_zoo_light" not in sys.modules:  # zoo's folder as a package whose __init__ never runs
        package = ModuleType("_zoo_light")
        package.__path__ = list(importlib.util.find_spec("zoo").submodule_search_locations)
        sys.modules["_zoo_light"] = package
    return importlib.import_module("_zoo_light.schema")
