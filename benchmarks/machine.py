"""The machine a benchmark ran on, for its results file: the CPU as the kernel names it, its
vector extensions that matter to PyTorch and onnxruntime kernels, and the cores.

    python benchmarks/machine.py        # prints the JSON that the benchmark scripts record
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# Flags of /proc/cpuinfo that select kernels in PyTorch (oneDNN) and onnxruntime (MLAS).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu() -> dict:
    """The model, vector extensions, logical and usable cores, from /proc/cpuinfo
    where there is one (Linux), else what ``platform`` knows."""
    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in (platform.processor(), platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "model": model,
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def describe() -> str:
    """One line for a markdown results file."""
    c = cpu()
    extensions = ", ".join(c["vector_extensions"]) or "no AVX2"
    return f"{c['model']} ({extensions}; {c['usable_cores']} of {c['logical_cores']} logical cores usable)"


if __name__ == "__main__":
    print(json.dumps(cpu(), indent=1))
