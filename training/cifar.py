"""CIFAR-10 and CIFAR-100 as published: python-pickle batches, read without running any code.

The batches are pickles, and unpickling a user's file can execute code: a restricted unpickler
rebuilds only the plain containers and numpy arrays these files hold, and refuses anything else.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch

from .bundle import one_line

Split = tuple[torch.Tensor, torch.Tensor]  # images, labels

# kind -> (training batches, test batch, meta file, label key, label-names key, archive folder)
_CIFAR_LAYOUT = {
    "cifar10": (
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
        "cifar-10-batches-py",
    ),
    "cifar100": (["train"], "test", "meta", b"fine_labels", b"fine_label_names", "cifar-100-python"),
}


def read_cifar(kind: str, root: Path) -> tuple[list[str], Split, Split]:
    """Class names, training and test images (uint8 N x 3 x 32 x 32) and labels of a CIFAR
    folder (or the folder holding its extracted archive), every field checked."""
    train_names, test_name, meta_name, label_key, names_key, archive_folder = _CIFAR_LAYOUT[kind]
    if not (root / meta_name).exists() and (root / archive_folder).is_dir():
        root = root / archive_folder  # the folder that contains the extracted archive
    meta = _cifar_dict(root, meta_name, kind)
    names = meta.get(names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise ValueError(f"{root / meta_name}: no {names_key.decode()} list of class names")
    labels = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    parts = [_cifar_batch(root, name, kind, label_key, len(labels)) for name in train_names]
    train = torch.cat([images for images, _ in parts]), torch.cat([targets for _, targets in parts])
    return labels, train, _cifar_batch(root, test_name, kind, label_key, len(labels))


def _cifar_dict(root: Path, name: str, kind: str) -> dict:
    path = root / name
    if not path.is_file():
        train_names, test_name, meta_name = _CIFAR_LAYOUT[kind][:3]
        raise FileNotFoundError(
            f"{path} not found: {kind}:PATH wants the python batches {', '.join(train_names + [test_name, meta_name])}"
        )
    loaded = _unpickle_data(path)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a {kind} batch file (it holds a {type(loaded).__name__}, not a dict)")
    return {(k.encode() if isinstance(k, str) else k): v for k, v in loaded.items()}


def _cifar_batch(
    root: Path, name: str, kind: str, label_key: bytes, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    path = root / name
    batch = _cifar_dict(root, name, kind)
    data, targets = _as_array(batch.get(b"data")), _as_array(batch.get(label_key))
    if data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' is not a uint8 array of N x 3072 pixels")
    in_range = targets is not None and targets.shape == (len(data),) and targets.dtype.kind in "iu"
    if not in_range or (len(targets) and not 0 <= targets.min() <= targets.max() < num_classes):
        raise ValueError(f"{path}: {label_key!r} is not {len(data)} labels in 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(targets.astype(np.int64))


def _as_array(value: object) -> np.ndarray | None:
    if isinstance(value, _ArrayStandIn):
        return value.array
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list):
        return np.asarray(value)
    return None


class _RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something beyond plain data and numeric arrays."""


class _DtypeStandIn:
    """Inert stand-in for ``numpy.dtype``: plain numeric types only, byte order from its state."""

    def __init__(self, code: object, align: object = False, copy: object = True):
        code = code.decode("ascii", "replace") if isinstance(code, bytes) else code
        if code not in ("b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"):
            raise _RefusedPickle(f"array type {code!r} is not a plain numeric type")
        self.dtype = np.dtype(code)

    def __setstate__(self, state: object) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayStandIn:
    """Inert stand-in for ``numpy.ndarray``: its pickled state (shape, type, raw bytes) becomes
    ``array``, built by ``numpy.frombuffer``."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _RefusedPickle("malformed array state")
        shape, dtype, fortran_order, raw = state[-4:]  # (version,) shape, dtype, fortran order, bytes
        self.array = _array_from(raw, dtype, shape, "F" if fortran_order else "C")


def _reconstruct(cls: object, shape: object = (0,), typecode: object = b"b") -> _ArrayStandIn:
    if cls is not _ArrayStandIn:
        raise _RefusedPickle("array reconstruction of something that is not an array")
    return _ArrayStandIn()


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """Stand-in for ``numpy.core.numeric._frombuffer``, which pickle protocol 5 uses."""
    return _array_from(buffer, dtype, shape, "F" if order == "F" else "C")


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, with which Python 3 writes bytes at pickle protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedPickle("_codecs.encode is only accepted for latin-1 text")
    return text.encode("latin1")


def _array_from(raw: object, dtype: object, shape: object, order: str) -> np.ndarray:
    if not isinstance(dtype, _DtypeStandIn) or not isinstance(raw, (bytes, bytearray)):
        raise _RefusedPickle("malformed array")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _RefusedPickle("malformed array shape")
    if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
        raise _RefusedPickle(
            f"array data holds {len(raw)} bytes, "
            f"but shape {shape} of {dtype.dtype} needs {math.prod(shape) * dtype.dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype.dtype).reshape(shape, order=order)


_STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayStandIn,
    ("numpy", "dtype"): _DtypeStandIn,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_bytes,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global at all, so loading a file can run no code.

    CIFAR ships as pickles, and unpickling normally imports and calls whatever the file names
    (``os.system`` included). Here ``find_class`` never returns a real module attribute: the
    few names that plain numpy arrays need are answered with the inert stand-ins above, which
    only rebuild numeric arrays from raw bytes; any other name refuses the file.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _STAND_INS[(module, name)]
        except KeyError:
            raise _RefusedPickle(f"it names {module}.{name}; only plain data and numeric arrays are loaded") from None


def _unpickle_data(path: Path) -> object:
    with open(path, "rb") as file:
        try:
            return _DataOnlyUnpickler(file, encoding="bytes").load()
        except _RefusedPickle as err:
            raise ValueError(f"{path}: refused to load: {one_line(err)}") from None
        except Exception as err:  # truncated or not a pickle: unpickling raises many kinds
            raise ValueError(
                f"{path}: corrupt or truncated batch file ({type(err).__name__}: {one_line(err)})"
            ) from None
