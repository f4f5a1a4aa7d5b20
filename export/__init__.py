"""ONNX export, verification, int8 quantization, and a torch-free runtime.

    from export import export_file
    result = export_file("family.safetensors", "member.onnx", width=0.5)
    print(result.summary())

Names are imported lazily so that ``export.runtime`` (onnxruntime + numpy only) can be used
where torch is not installed.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ExportResult": "onnx_export",
    "export_all": "onnx_export",
    "export_family": "family_export",
    "export_file": "onnx_export",
    "export_member": "onnx_export",
    "read_record": "onnx_export",
    "to_onnx": "onnx_export",
    "merge_low_rank": "merge",
    "quantize_int8": "quantize",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
