"""Byte baselines of the GPT results. The byte unigram model of the GPT comparison (``compare.py``'s
low-rank GPT rows): the bits per byte of a model that ignores context, fitted on the training split (byte counts plus
one, so no byte has probability 0) and scored on exactly the bytes the members are scored on
(the targets of every validation window). A trained byte model that does not beat it has
learnt nothing beyond byte frequencies.

    python benchmarks/byte_baselines.py   # writes benchmarks/results/byte_baselines.json

The corpus is ``compare.py``'s: the first 1 MiB of the training split of zoo's ``stdlib``
corpus (this Python's standard library, so the number belongs to the Python version recorded).
Also the byte bigram model (counts of byte pairs plus one) on the whole ``stdlib`` corpus at
``zoo train``'s default context (256), the baseline of the README's training table.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare import GPT_ARGS, GPT_CORPUS_BYTES, write_corpus  # noqa: E402

from training.data import load_data  # noqa: E402
from zoo.fileio import atomic_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "byte_baselines.json"


def bits_per_byte(counts: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean -log2 p(byte) of ``targets`` under the distribution ``counts / counts.sum()``."""
    log_p = torch.log2(counts.double() / counts.sum())
    return float(-log_p[targets.long()].mean())


def bigram_bits_per_byte(bundle) -> float:
    """A byte bigram model fitted on the training split, scored on every (input, target) pair
    of the validation windows."""
    train = bundle.train.read(0, bundle.train.size).long()
    counts = torch.bincount(train[:-1] * 256 + train[1:], minlength=256 * 256).view(256, 256) + 1
    log_p = torch.log2(counts.double() / counts.sum(1, keepdim=True))
    pairs = [bundle.val[i] for i in range(len(bundle.val))]
    inputs, targets = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])
    return float(-log_p[inputs, targets].mean())


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="zoo-byte-baselines-") as folder:
        spec = write_corpus(Path(folder), GPT_CORPUS_BYTES)
        bundle = load_data(spec, seq_len=GPT_ARGS["seq_len"])
    train = bundle.train.read(0, bundle.train.size).long()
    targets = torch.cat([bundle.val[i][1] for i in range(len(bundle.val))])
    fitted = torch.bincount(train, minlength=256) + 1  # add-one: bytes unseen in training stay possible
    report = {
        "corpus": f"first {GPT_CORPUS_BYTES} bytes of the stdlib corpus's training split (compare.py's GPT rows)",
        "python": platform.python_version(),
        "seq_len": GPT_ARGS["seq_len"],
        "train_bytes": int(train.numel()),
        "scored_bytes": int(targets.numel()),
        "unigram_bits_per_byte": round(bits_per_byte(fitted, targets), 4),
        "validation_entropy_bits_per_byte": round(bits_per_byte(torch.bincount(targets, minlength=256), targets), 4),
    }
    stdlib = load_data("stdlib", seq_len=256)
    report["stdlib_bigram_bits_per_byte"] = round(bigram_bits_per_byte(stdlib), 4)
    report["stdlib_bigram_scored_bytes"] = len(stdlib.val) * 256
    text = json.dumps(report, indent=1) + "\n"
    print(text, end="")
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    main()
