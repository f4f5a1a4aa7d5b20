"""Latency of a member in onnxruntime at batch 1, fast enough to measure hundreds of members.

``zoo search`` measures every candidate it considers under a latency budget. The dynamo
exporter that ``zoo export`` uses takes seconds to tens of seconds per member here, so the
search exports its candidates with PyTorch's TorchScript exporter (under a second), which
writes the same operators for these plain sliced networks; onnxruntime then applies the same
graph optimisations to both. A language model is exported through the cached decoder without
a cache, whose attention is then written out with floored scores (:mod:`export.kv_cache`; the
model's own causal attention would go through slow subnormal numbers in onnxruntime on some
CPUs). The TorchScript exporter stops before opset 23's Attention op, which the real exports
use for both the ViT and the GPT, so here attention stays MatMul, Softmax, MatMul, slower than
in the real export. The member the search picks is exported for real and measured again on its
own, and the search reports how far the two measurements are apart.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
import warnings
from pathlib import Path

import torch

import zoo
from zoo import ElasticModel, Member

from .benchmark import onnx_session, time_interleaved
from .kv_cache import CachedDecoder
from .merge import merge_low_rank


def latency_clock(threads: int):
    """The clock latency is timed with. On one thread onnxruntime computes in the calling
    thread, so that thread's CPU time is the member's latency on the device, without the time
    it waits for a core other processes hold (on a loaded machine that wait is most of the wall
    time, and varies run to run). More threads: wall time."""
    return time.thread_time if threads == 1 else time.perf_counter


def session_latency(path: str | Path, example, threads: int = 1, repeats: int = 20) -> float:
    """Median milliseconds of one batch through the ONNX file at ``path`` (after a warm-up)."""
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    run = {"ort": lambda: session.run(None, {name: example})}
    return time_interleaved(run, repeats, warmup=3, clock=latency_clock(threads))["ort"]


def export_fast(module: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """``module`` on ``example`` as ONNX with the TorchScript exporter (under a second), quietly."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
        )
    return Path(path)


@torch.no_grad()
def model_latency(small: ElasticModel, threads: int = 1, repeats: int = 20, batch: int = 1) -> float:
    """Median milliseconds of a standalone (sliced) model at ``batch`` in onnxruntime."""
    example = small.example_input(batch)
    exported = CachedDecoder(small) if small.input_kind == "tokens" else small
    with tempfile.TemporaryDirectory(prefix="zoo-latency-") as work:
        path = export_fast(exported, example, Path(work) / "member.onnx")
        return session_latency(path, example.numpy(), threads, repeats)


@torch.no_grad()
def member_latency(model: ElasticModel, member: Member, threads: int = 1, repeats: int = 20) -> float:
    """Median milliseconds of ``member`` of ``model`` at batch 1 in onnxruntime with ``threads``.

    Batch-norm families need the member's statistics first (``zoo.recalibrate_bn``): it is
    sliced like any export.
    """
    small = zoo.slice(model, member).eval()
    merge_low_rank(small)
    return model_latency(small, threads, repeats)
