"""Running an exported member with onnxruntime alone: no torch, no zoo.

An exported file carries everything needed to use it (see ``docs/design.md``, export
contract): one input ``input``, one output ``logits`` and a JSON record under the model
metadata key ``"zoo"`` with the input kind, shape, normalisation and class labels. So a
deployment needs onnxruntime and numpy (and Pillow only to decode image files):

    predictor = Predictor("member.onnx")            # or device="cuda"
    predictor.top_k(["cat.png"], k=3)              # [[("cat", 0.91), ...]]
    predictor.generate("Once upon", max_new_bytes=40, temperature=0.8, seed=0)

The execution provider is checked after the session starts: asking for CUDA where
onnxruntime cannot run it is an error, never a silent fallback to the CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnxruntime as ort

ImageLike = Union[str, os.PathLike, np.ndarray]

_INPUT, _OUTPUT = "input", "logits"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's "L" mode
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _providers(device: str) -> list:
    """The provider list for ``device`` ("cpu", "cuda" or "cuda:N"); CUDA must exist."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"CUDA was requested but this onnxruntime has no CUDA execution provider "
            f"(it has {', '.join(available)}); install onnxruntime-gpu or use device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": int(match.group(1) or 0)}), "CPUExecutionProvider"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """An (n_out, n_in) matrix of antialiased bilinear (triangle filter) weights.

    The same filter as Pillow's BILINEAR and torch's ``interpolate(..., antialias=True)``:
    on a downscale the triangle widens with the scale, so every input pixel contributes
    and a large image does not alias.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out) + 0.5) * scale
    sources = np.arange(n_in) + 0.5
    weights = np.clip(1.0 - np.abs(sources[None, :] - centers[:, None]) / support, 0.0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an H x W x C float image to ``height`` x ``width`` (separable, antialiased)."""
    if image.shape[0] != height:
        image = np.einsum("oh,hwc->owc", resize_weights(image.shape[0], height), image)
    if image.shape[1] != width:
        image = np.einsum("ow,hwc->hoc", resize_weights(image.shape[1], width), image)
    return image


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
    """Decode an image file to a uint8 H x W x C array (Pillow is needed only here)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ValueError("reading image files needs Pillow (pip install pillow); or pass numpy arrays") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({_first_line(err)})") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


class Predictor:
    """An exported zoo member in an onnxruntime session, with its recorded preprocessing.

    ``device`` is "cpu" (default), "cuda" or "cuda:N"; ``threads`` fixes onnxruntime's
    intra-op thread count (default: onnxruntime's choice).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such ONNX file: {self.path}")
        providers = _providers(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: provider problems are reported by us
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be at least 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            on_cuda = "" if device == "cpu" else " on the CUDA execution provider"
            raise ValueError(f"{self.path} is not a loadable ONNX model{on_cuda} ({_first_line(err)})") from None
        if device != "cpu" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise ValueError(
                f"CUDA was requested but onnxruntime could not start its CUDA execution provider "
                f"(active: {', '.join(self.session.get_providers())}); check the GPU and CUDA libraries or use device cpu"
            )
        self.device = device
        self.metadata = self._read_metadata()
        self._check_signature()

    # ----- the file ---------------------------------------------------------------------
    def _read_metadata(self) -> dict:
        props = self.session.get_modelmeta().custom_metadata_map
        if "zoo" not in props:
            raise ValueError(f"{self.path} is an ONNX model but not a zoo export (no 'zoo' metadata)")
        try:
            metadata = json.loads(props["zoo"])
            kind = metadata["input"]["kind"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{self.path} has corrupt zoo metadata") from None
        if kind not in ("image", "tokens"):
            raise ValueError(f"{self.path} has an unknown input kind {kind!r} in its zoo metadata")
        return metadata

    def _check_signature(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [_INPUT] or _OUTPUT not in [o.name for o in outputs]:
            raise ValueError(
                f"{self.path} does not follow the zoo export contract "
                f"(inputs {[i.name for i in inputs]}, outputs {[o.name for o in outputs]}; expected 'input' -> 'logits')"
            )
        self._input_type = inputs[0].type

    @property
    def kind(self) -> str:
        """"image" for classifiers, "tokens" for byte-level language models."""
        return self.metadata["input"]["kind"]

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses, first one preferred."""
        return self.session.get_providers()

    @property
    def labels(self) -> list[str] | None:
        """Class names recorded at export, or None (then classes are named by their index)."""
        labels = self.metadata.get("labels")
        return [str(label) for label in labels] if labels else None

    def _require(self, kind: str, action: str) -> None:
        if self.kind != kind:
            what = {"image": "an image classifier", "tokens": "a language model"}[self.kind]
            hint = "use generate with a prompt" if self.kind == "tokens" else "use classify with images"
            raise ValueError(f"{self.path} is {what}; it cannot {action} ({hint})")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for an already preprocessed batch."""
        return self.session.run([_OUTPUT], {_INPUT: batch})[0]

    # ----- images -----------------------------------------------------------------------
    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Images as the model's N x C x H x W input, exactly as recorded at export.

        ``images``: a file path, an H x W or H x W x C array (uint8 in 0..255 or float in
        [0, 1]), an N x H x W x C array, or a list of those. Each is converted to the
        model's channel count, resized to its H x W, scaled to [0, 1] and normalised.
        """
        self._require("image", "classify images")
        spec = self.metadata["input"]
        channels, height, width = spec["shape"]
        mean = np.asarray(spec["mean"], dtype=np.float32)
        std = np.asarray(spec["std"], dtype=np.float32)
        batch = [self._to_unit_float(image, channels) for image in _as_list(images)]
        batch = [(resize(image, height, width) - mean) / std for image in batch]
        return np.stack(batch).transpose(0, 3, 1, 2).astype(_NUMPY_TYPES.get(self._input_type, np.float32))

    @staticmethod
    def _to_unit_float(image: ImageLike, channels: int) -> np.ndarray:
        """One image as an H x W x ``channels`` float32 array in [0, 1]."""
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image, channels)
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
            raise ValueError(f"an image must be H x W or H x W x C with C in 1, 3, 4; got shape {image.shape}")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        elif np.issubdtype(image.dtype, np.floating):
            image = image.astype(np.float32)
            if not np.isfinite(image).all():
                raise ValueError("an image contains NaN or infinite values")
            if image.min() < 0.0 or image.max() > 1.0:
                raise ValueError(
                    f"float images must lie in [0, 1], got values in [{image.min():g}, {image.max():g}]; pass uint8 for 0..255"
                )
        else:
            raise ValueError(f"images must be uint8 (0..255) or float (0..1), got dtype {image.dtype}")
        image = image[:, :, :3]  # drop alpha
        if channels == 1 and image.shape[2] == 3:
            return image @ _LUMA[:, None]
        if channels == 3 and image.shape[2] == 1:
            return np.repeat(image, 3, axis=2)
        if image.shape[2] != channels:
            raise ValueError(f"cannot turn a {image.shape[2]}-channel image into the model's {channels} channels")
        return image

    def classify(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities, N x classes (softmax of the logits)."""
        return softmax(self.run(self.preprocess(images)).astype(np.float32))

    def top_k(self, images: ImageLike | Sequence[ImageLike], k: int = 5) -> list[list[tuple[str, float]]]:
        """For each image, its ``k`` most probable (label, probability) pairs, best first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        probabilities = self.classify(images)
        labels = self.labels or [str(i) for i in range(probabilities.shape[1])]
        if len(labels) != probabilities.shape[1]:
            raise ValueError(f"{self.path} records {len(labels)} labels for {probabilities.shape[1]} classes")
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(labels[i], float(row[i])) for i in order] for row, order in zip(probabilities, best)]

    # ----- language models --------------------------------------------------------------
    def generate(
        self, prompt: bytes | str, max_new_bytes: int = 64, temperature: float = 0.0, seed: int | None = None
    ) -> bytes:
        """Continue ``prompt`` by ``max_new_bytes`` bytes; returns only the new bytes.

        ``temperature`` 0 is greedy decoding; above 0 samples from softmax(logits / T) with
        a generator seeded by ``seed`` (same seed, same text). The context is cropped to
        the model's ``context_length`` most recent bytes.
        """
        self._require("tokens", "generate text")
        data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        if not data:
            raise ValueError("the prompt is empty; give at least one byte")
        if max_new_bytes < 0:
            raise ValueError(f"max_new_bytes must be at least 0, got {max_new_bytes}")
        if not (math.isfinite(temperature) and temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        context_length = int(self.metadata["input"]["context_length"])
        rng = np.random.default_rng(seed)
        tokens, new = list(data), bytearray()
        for _ in range(max_new_bytes):
            context = np.asarray(tokens[-context_length:], dtype=np.int64)[None, :]
            logits = self.run(context)[0, -1].astype(np.float64)
            if temperature == 0.0:
                token = int(np.argmax(logits))
            else:
                token = int(rng.choice(logits.shape[0], p=softmax(logits / temperature)))
            if token > 255:
                raise ValueError(f"{self.path} produced token {token}, which is not a byte")
            tokens.append(token)
            new.append(token)
        return bytes(new)


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """A single image (path or 2-D/3-D array) or a batch (4-D array, list) as a list."""
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    images = list(images)
    if not images:
        raise ValueError("no images were given")
    return images
