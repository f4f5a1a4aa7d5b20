"""A language-model family's tokenizer, recorded in the family itself.

The tokenizer's files travel inside every file made from the family (weights, checkpoints,
sliced members, ONNX exports) as ``metadata["tokenizer"]``: a mapping from file name to the
file's text (``tokenizer.json`` always, and ``tokenizer_config.json``,
``special_tokens_map.json`` where the source folder had them). One file is then all a user
needs: ``zoo train`` tokenizes text with it, ``zoo slice`` writes it back out as files beside a
transformers folder, ``zoo run --prompt`` decodes with it.

The ``tokenizers`` library (the ``lm`` extra) is imported only when a tokenizer is used.
"""

from __future__ import annotations

import os
from pathlib import Path

from .fileio import atomic_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INSTALL = "tokenizing text needs the lm extra: pip install 'zoo[lm]' (transformers, tokenizers)"


def read_tokenizer_files(folder: str | os.PathLike) -> dict[str, str]:
    """The tokenizer files of a transformers folder as ``{name: text}``; empty without ``tokenizer.json``."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return {}
    files = {}
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            try:
                files[name] = (folder / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"{folder / name} is not a readable text file ({err})") from None
    return files


def recorded_tokenizer_files(metadata: dict) -> dict[str, str]:
    """The tokenizer files a family's metadata records (empty if none)."""
    files = metadata.get("tokenizer") if isinstance(metadata, dict) else None
    if not isinstance(files, dict) or not isinstance(files.get("tokenizer.json"), str):
        return {}
    return {name: text for name, text in files.items() if name in TOKENIZER_FILES and isinstance(text, str)}


def load_tokenizer(metadata: dict, what: str = "the family"):
    """The recorded tokenizer as a ``tokenizers.Tokenizer``; a one-line ``ValueError`` if there is none."""
    files = recorded_tokenizer_files(metadata)
    if not files:
        raise ValueError(f"{what} records no tokenizer (convert it from a transformers folder with tokenizer.json)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(INSTALL) from None
    try:
        return Tokenizer.from_str(files["tokenizer.json"])
    except Exception as err:  # the Rust library raises its own Exception type for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"the tokenizer recorded in {what} is not readable ({first})") from None


def write_tokenizer_files(metadata: dict, folder: str | os.PathLike) -> list[Path]:
    """Write the recorded tokenizer files into ``folder`` (each atomically); the paths written."""
    written = []
    for name, text in recorded_tokenizer_files(metadata).items():
        with atomic_path(Path(folder) / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(Path(folder) / name)
    return written
