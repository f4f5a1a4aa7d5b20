"""Checking an exported file: the ONNX checker, then onnxruntime against PyTorch.

The comparison runs the real onnxruntime session on random inputs at two batch sizes (and, for
language models, two sequence lengths), so a graph whose dynamic axes were specialised to the
example input, or whose numbers drifted, fails here rather than in deployment. A language model
with a key/value cache is also run in two halves, the second fed the first one's cache, and
must give the same logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch

from zoo import ElasticModel

INPUT_NAME, OUTPUT_NAME = "input", "logits"
FP32_TOLERANCE = 1e-4  # per unit of the outputs' scale (absolute for outputs within +-1)
VERIFY_BATCH_SIZES = (1, 3)
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def require_device(device: str) -> None:
    """Refuse a device that PyTorch or onnxruntime cannot use here: never fall back silently."""
    if device not in _PROVIDERS:
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        available = ort.get_available_providers()
        if _PROVIDERS["cuda"] not in available:
            raise ValueError(
                "--device cuda needs onnxruntime's CUDAExecutionProvider, which this onnxruntime does not have "
                f"(it has {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
        if not torch.cuda.is_available():
            raise ValueError("--device cuda needs a CUDA GPU for PyTorch, and torch.cuda.is_available() is False here")


def session(path: str | os.PathLike, device: str = "cpu") -> ort.InferenceSession:
    """An onnxruntime session on exactly the requested execution provider."""
    require_device(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    # TF32 would make CUDA results differ from fp32 by far more than the tolerance.
    provider = (_PROVIDERS[device], {"use_tf32": "0"}) if device == "cuda" else _PROVIDERS[device]
    sess = ort.InferenceSession(str(path), options, providers=[provider])
    if sess.get_providers()[0] != _PROVIDERS[device]:
        raise ValueError(f"onnxruntime did not start {_PROVIDERS[device]} for {path} (it runs {sess.get_providers()})")
    return sess


def check_model(path: str | os.PathLike) -> None:
    """The ONNX checker with full shape and type inference."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ValueError(f"the exported graph fails the ONNX checker: {str(err).strip().splitlines()[0]}") from None


def verification_inputs(model: ElasticModel, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs at batch 1 and 3 (times two sequence lengths for language models)."""
    generator = torch.Generator().manual_seed(seed)
    if model.input_kind == "tokens":
        context = model.context_length
        lengths = sorted({max(1, context // 3), context})
        return [
            torch.randint(0, model.num_classes, (b, t), generator=generator)
            for b in VERIFY_BATCH_SIZES
            for t in lengths
        ]
    shape = tuple(model.pretrained_cfg["input_size"])
    return [torch.randn((b, *shape), generator=generator) for b in VERIFY_BATCH_SIZES]


class Gap(NamedTuple):
    """The largest |onnxruntime - PyTorch| and the largest |PyTorch| output it was measured on."""

    max_abs: float
    scale: float

    def allowed(self, tolerance: float = FP32_TOLERANCE) -> float:
        """float32 rounding grows with the numbers rounded: ``tolerance`` per unit of the outputs'
        scale (logits of 160 round 160 times coarser than logits of 1), absolute below 1."""
        return tolerance * max(1.0, self.scale)

    def within(self, tolerance: float = FP32_TOLERANCE) -> bool:
        return self.max_abs <= self.allowed(tolerance)

    def failure(self, what: str, tolerance: float = FP32_TOLERANCE) -> str:
        return (
            f"verification failed: {what} differs from PyTorch by {self.max_abs:.3g} (> {self.allowed(tolerance):.3g}, "
            f"{tolerance:g} of the outputs' scale {max(1.0, self.scale):.3g}); nothing was written"
        )


@torch.no_grad()
def max_abs_difference(
    model: ElasticModel,
    path: str | os.PathLike,
    device: str = "cpu",
    sess: ort.InferenceSession | None = None,
    feed: dict[str, np.ndarray] | None = None,
) -> Gap:
    """Largest |onnxruntime - PyTorch| over the verification inputs, and the outputs' scale
    (``sess``: a session of ``path`` already started; ``feed``: more inputs, e.g. a family file's
    ``member``)."""
    sess = sess or session(path, device)
    torch_device = next(model.parameters()).device
    worst, scale = 0.0, 0.0
    for x in verification_inputs(model):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            expected = model(x.to(torch_device)).float().cpu().numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy(), **(feed or {})})[0]
        if got.shape != expected.shape:
            raise ValueError(
                f"onnxruntime gave logits of shape {got.shape} for input {tuple(x.shape)}, PyTorch {expected.shape}"
            )
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - expected))))
        scale = max(scale, float(np.max(np.abs(expected))))
        if x.shape[0] == 1 and x.shape[1] >= 2 and _cache_inputs(sess):
            worst = max(worst, float(np.max(np.abs(_cached_logits(sess, x.numpy()).astype(np.float64) - expected))))
    return Gap(worst, scale)


def _cache_inputs(sess: ort.InferenceSession) -> list[str]:
    return [i.name for i in sess.get_overridable_initializers() if i.name.startswith("past_key_values.")]


def _cached_logits(sess: ort.InferenceSession, tokens: np.ndarray) -> np.ndarray:
    """Logits of ``tokens`` computed in two halves, the second reading the first's cache."""
    split = tokens.shape[1] // 2
    names = _cache_inputs(sess)
    outputs = [OUTPUT_NAME, *(name.replace("past_key_values.", "present.", 1) for name in names)]
    first, *cache = sess.run(outputs, {INPUT_NAME: tokens[:, :split]})
    second = sess.run([OUTPUT_NAME], {INPUT_NAME: tokens[:, split:], **dict(zip(names, cache))})[0]
    return np.concatenate([first, second], axis=1)


def verify(
    model: ElasticModel, path: str | Path, device: str = "cpu", tolerance: float | None = FP32_TOLERANCE
) -> float:
    """Check the graph, compare it with PyTorch; above ``tolerance`` (of the outputs' scale) is an
    error. Returns the max diff."""
    check_model(path)
    gap = max_abs_difference(model, path, device)
    if tolerance is not None and not gap.within(tolerance):
        raise ValueError(gap.failure("onnxruntime", tolerance))
    return gap.max_abs
