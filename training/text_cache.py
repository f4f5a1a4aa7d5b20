"""``text:PATH`` as a cache file: the corpus's bytes concatenated once, read back per window.

The first run over a text file or folder copies its text files (sorted by path; binary and
hidden files skipped) into one uint8 file under ``$ZOO_CACHE_DIR/text`` (default
``~/.cache/zoo/text``), in chunks of ``CHUNK`` bytes, through :func:`zoo.fileio.atomic_path`:
an interrupted build leaves no cache, never a partial one. The file's name holds a digest of the
sources' paths, sizes and modification times, so a later run with the same sources reuses it and
a changed source builds a new one (the stale cache of the same source is removed), and ends
with its own size: a cache whose size differs (truncated, damaged) is built again.

Windows are read from the file with positional reads (``os.pread``), not through a memory map:
on Linux 6 a map's resident memory grows by whole page-cache folios (measured: 1 MiB per touched
byte on this machine), so random windows would bring most of a large corpus into the process's
memory; a read keeps it at the bytes asked for, and the OS page cache serves repeats.

A family that records a tokenizer (:mod:`zoo.tokenizer`) reads the same text as tokens: a token
cache (:func:`cached_tokens`) built once from the byte cache by the same rules (streamed in
``CHUNK``-byte pieces cut at line ends, written through ``atomic_path``, named with a digest of
the byte cache's name and of the tokenizer, and with its own token count). A record per token:
its id and the UTF-8 bytes of the text it covers (up to the next token), so a model's loss per
token converts to bits per byte of that text exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from zoo.fileio import atomic_path

CACHE_ENV = "ZOO_CACHE_DIR"
CHUNK = 2**20  # bytes copied at a time while building: the build's memory, whatever the corpus
TOKEN_RECORD = np.dtype([("id", "<i4"), ("bytes", "<i4")])  # a token cache's record: 8 bytes per token
_BINARY_SNIFF_BYTES = 8000  # git's rule: a NUL byte in the first 8000 bytes means binary


def cache_folder() -> Path:
    """Where text caches live: ``$ZOO_CACHE_DIR/text``, else ``$XDG_CACHE_HOME/zoo/text``, else
    ``~/.cache/zoo/text``."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoo"
    return Path(root) / "text"


def cached_corpus(path: Path) -> Path:
    """The cache file of the text at ``path`` (a file, or a folder of text files), built if it
    does not exist yet for the sources as they are now."""
    path = path.resolve()
    sources = _candidates(path)
    stats = [(str(p), s.st_size, s.st_mtime_ns) for p in sources for s in (p.stat(),)]
    source_id = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
    state_id = hashlib.blake2b(json.dumps(stats).encode(), digest_size=10).hexdigest()
    stem = f"{re.sub(r'[^A-Za-z0-9._-]', '_', path.name)[:40]}-{source_id}"
    prefix = f"{stem}-{state_id}-"
    cache = next((p for p in sorted(cache_folder().glob(f"{prefix}*.u8")) if _intact(p, prefix)), None)
    if cache is None:  # none yet, or a damaged one (truncated, cut short by a full disk): build it
        built = cache_folder() / f"{stem}-{state_id}.u8"
        written = _build(path, sources, built)
        cache = built.rename(cache_folder() / f"{prefix}{written}.u8")  # complete, then named with its size
        for stale in cache.parent.glob(f"{stem}-*.u8"):
            if stale != cache:
                with contextlib.suppress(OSError):
                    stale.unlink()
    return cache


def _intact(cache: Path, prefix: str) -> bool:
    """A cache holds the byte count its name records (the one check raw bytes allow)."""
    count = cache.name[len(prefix) : -len(".u8")]
    with contextlib.suppress(OSError):
        return count.isdigit() and cache.stat().st_size == int(count)
    return False


def _candidates(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [Path(folder, name) for name in names if not name.startswith(".")]
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(path).as_posix())


def _build(path: Path, sources: list[Path], cache: Path) -> int:
    """Concatenate the text files among ``sources`` into ``cache``; refuse binary or no text.
    Returns the bytes written."""
    problem, written = None, 0
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as out:
            for source in sources:
                try:
                    copied = _copy_text(source, out)
                except OSError as err:
                    problem = f"cannot read {source}: {err.strerror or err}"
                    break
                if copied is None and path.is_file():
                    problem = f"{path} is not a text file (it has NUL bytes)"
                    break
                written += copied or 0
        if problem is None and written == 0:
            problem = f"no text under {path} (binary and hidden files are skipped)"
        if problem is not None:
            raise ValueError(problem)  # outside the except block: the cache is not written
    return written


def _copy_text(source: Path, out) -> int | None:
    """Append ``source`` to ``out`` in chunks; None (nothing written) if it is binary."""
    with open(source, "rb") as file:
        head = file.read(_BINARY_SNIFF_BYTES)
        if b"\0" in head:
            return None
        out.write(head)
        copied = len(head)
        while chunk := file.read(CHUNK):
            out.write(chunk)
            copied += len(chunk)
        return copied


def tokenizer_vocab_size(tokenizer_json: str) -> int:
    """The ids the tokenizer gives (added tokens included): what a family's vocabulary must hold."""
    from zoo.tokenizer import load_tokenizer

    return load_tokenizer({"tokenizer": {"tokenizer.json": tokenizer_json}}).get_vocab_size(with_added_tokens=True)


def cached_tokens(path: Path, tokenizer_json: str) -> Path:
    """The token cache of the text at ``path`` under the tokenizer ``tokenizer_json`` (a
    ``tokenizer.json`` text), built if this text and tokenizer have none yet."""
    corpus = cached_corpus(path)
    stem, state_id, _ = corpus.name[: -len(".u8")].rsplit("-", 2)
    tokenizer_id = hashlib.blake2b(tokenizer_json.encode(), digest_size=8).hexdigest()
    prefix = f"{stem}-{tokenizer_id}-{state_id}-"
    cache = next((p for p in sorted(corpus.parent.glob(f"{prefix}*.tok")) if _intact_tokens(p, prefix)), None)
    if cache is None:
        built = corpus.parent / f"{stem}-{tokenizer_id}-{state_id}.tok"
        count = _build_tokens(corpus, tokenizer_json, built)
        cache = built.rename(corpus.parent / f"{prefix}{count}.tok")
        for stale in cache.parent.glob(f"{stem}-{tokenizer_id}-*.tok"):  # this text, this tokenizer, older text
            if stale != cache:
                with contextlib.suppress(OSError):
                    stale.unlink()
    return cache


def _intact_tokens(cache: Path, prefix: str) -> bool:
    count = cache.name[len(prefix) : -len(".tok")]
    with contextlib.suppress(OSError):
        return count.isdigit() and cache.stat().st_size == int(count) * TOKEN_RECORD.itemsize
    return False


def _build_tokens(corpus: Path, tokenizer_json: str, cache: Path) -> int:
    """Tokenize the byte cache ``corpus`` piece by piece (``CHUNK`` bytes, cut after a line end
    so no token straddles two pieces) into ``cache``; returns the token count."""
    from zoo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer({"tokenizer": {"tokenizer.json": tokenizer_json}})
    count, rest = 0, b""
    with atomic_path(cache) as tmp, open(corpus, "rb") as source, open(tmp, "wb") as out:
        while True:
            block = source.read(CHUNK)
            data = rest + block
            cut = len(data) if not block else data.rfind(b"\n") + 1 or len(data)
            piece, rest = data[:cut], data[cut:]
            if piece:
                records = _token_records(tokenizer, piece)
                out.write(records.tobytes())
                count += len(records)
            if not block:
                break
    return count


def _token_records(tokenizer, piece: bytes) -> np.ndarray:
    """The tokens of ``piece`` with the bytes each covers: from its start to the next token's
    (the last one to the piece's end), so they sum to ``len(piece)``."""
    text = piece.decode("utf-8", errors="replace")
    encoding = tokenizer.encode(text, add_special_tokens=False)
    records = np.zeros(len(encoding.ids), TOKEN_RECORD)
    if not len(records):
        return records
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    byte_at = np.concatenate(([0], np.cumsum(char_bytes)))  # the byte offset of every character
    starts = np.maximum.accumulate(byte_at[np.array([start for start, _ in encoding.offsets])])
    starts = np.minimum(starts, len(piece))  # text that decoding replaced may be longer than the piece
    starts[0] = 0  # the first token also covers anything before it (text no token maps to)
    records["id"] = encoding.ids
    records["bytes"] = np.diff(np.append(starts, len(piece)))
    return records
