"""README numbers and the results files they come from: each row names a passage of the README
(whitespace as wrapped there does not matter), the file under benchmarks/results/ a script wrote
it to, and where the number is in that file: a piece of its text, or a JSON key and the digits
the README rounds to. A number rewritten in one place and not the other fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (README passage, results file, text in the file | (JSON key path, value as the README rounds it))
NUMBERS = [
    # layerwise training against the uniform members (benchmarks/space_search.py)
    ("2.2 points on ViT-Tiny (0.9777 → 0.9553 at width 0.75", "space/space.md", "| width=0.75 | 0.9777 | 0.9553 |"),
    ("0.9665 → 0.9497 at width 0.25", "space/space.md", "| width=0.25 | 0.9665 | 0.9497 |"),
    ("0.9832 → 0.9721 at width 1)", "space/space.md", "| width=1.0 | 0.9832 | 0.9721 |"),
    ("2.6225 → 2.6291 full", "space/space.md", "| rank=1.0, width=1.0 | 2.6225 | 2.6291 |"),
    ("2.9512 → 2.9790 at rank 0.25", "space/space.md", "| rank=0.25, width=1.0 | 2.9512 | 2.9790 |"),
    ("differed by -52% to +50% for ResNet-20", "space/space.md", "(-52%)"),
    ("differed by -52% to +50% for ResNet-20", "space/space.md", "(+50%)"),
    ("-2% to +21% for GPT-nano members", "space/space.md", "20.555 / 20.087 ms (-2%)"),
    ("-2% to +21% for GPT-nano members", "space/space.md", "13.078 / 15.885 ms (+21%)"),
    # byte-model evaluation against its FLOP bound (benchmarks/bench_eval.py)
    ("2.16x the bound with batches of 8192 bytes", "eval.md", "| evaluate | 21.85 | 2.16 |"),
    ("against 2.44x for the former batches", "eval.md", "| previous loop | 24.61 | 2.44 |"),
    ("load average 5.4 before and 4.5 after", "eval.md", "load average 5.4 before and 4.5 after"),
    # onnxruntime against PyTorch (benchmarks/bench_onnx.py)
    ("(`Intel(R) Xeon(R) Processor`, as", "onnx.md", "Intel(R) Xeon(R) Processor"),
    ("runs at 148 GFLOP/s in onnxruntime and 155 GFLOP/s in PyTorch", "onnx.md",
     "runs at 148 GFLOP/s in onnxruntime and 155 GFLOP/s in PyTorch"),
    ("- GPT-nano: 1.04× PyTorch with the change", "onnx.md", "| 419.4 | 7.94 | 8.22 | 1.04x |"),
    ("ResNet-18 stays at 0.53–0.55 on quiet machines (0.54× above", "onnx.md", "| 3628.1 | 45.89 | 24.62 | 0.54x |"),
    # byte generation (benchmarks/bench_generate.py)
    ("| uncached | 356 | 2.81 |", "generate.md", "| 356 | 2.81 | 1.00x |"),
    ("| cached | 2,794 (7.9× uncached) | 0.36 |", "generate.md", "| 2794 | 0.36 | 7.86x |"),
    ("A cached byte costs 1.60× a one-byte forward pass with an empty cache (0.22 ms), against 12.6×", "generate.md",
     "0.22 ms. A cached byte costs 1.60x that"),
    ("against 12.6× uncached", "generate.md", "an uncached byte 12.6x"),
    # byte baselines of the GPT results (benchmarks/byte_baselines.py)
    ("a byte unigram model scores 4.35 on this split", "byte_baselines.json", ("unigram_bits_per_byte", "4.35")),
    ("(a byte bigram model: 3.55,", "byte_baselines.json", ("stdlib_bigram_bits_per_byte", "3.55")),
    # the data pipeline (benchmarks/data_pipeline.py)
    ("| 1.107× in the one recorded run, the best of five", "data_pipeline.json", ("throughput.ratio", "1.107")),
    ("| 0.949× (0.92–1.00× over the five runs", "data_pipeline.json", ("throughput.cpu_ratio", "0.949")),
    ("| 0.957× (0.96–1.08×", "data_pipeline.json", ("throughput.same_draws_ratio", "0.957")),
    ("CPU 0.971× (0.97–1.03×)", "data_pipeline.json", ("throughput.same_draws_cpu_ratio", "0.971")),
    ("| 0.999× (≤ 1.2);", "data_pipeline.json", ("memory.ratios.folder.rss_mib", "0.999")),
    ("workers included, 1.019×", "data_pipeline.json", ("memory.ratios.folder.tree_pss_mib", "1.019")),
    ("| 1.055× (≤ 1.15);", "data_pipeline.json", ("memory.ratios.text.rss_mib", "1.055")),
]  # fmt: skip


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


README = _flat((ROOT / "README.md").read_text())


@pytest.mark.parametrize("passage, file, where", NUMBERS, ids=[f"{row[1]}:{row[0][:40]}" for row in NUMBERS])
def test_the_readme_number_is_in_its_results_file(passage, file, where):
    assert _flat(passage) in README, f"the README no longer says {passage!r}"
    path = RESULTS / file
    if isinstance(where, str):
        assert where in path.read_text(), f"{file} does not hold {where!r}"
        return
    key, shown = where
    value = json.loads(path.read_text())
    for part in key.split("."):
        value = value[part]
    decimals = len(shown.partition(".")[2])
    assert f"{value:.{decimals}f}" == shown, (
        f"{file} {key} = {value}, which the README would show as {value:.{decimals}f}"
    )


def test_numbers_the_readme_says_were_not_recorded_are_marked_so():
    """Where no file holds a number, the README says so next to it, and does not give it."""
    for passage in (
        "the figure before it was measured in an earlier session and not recorded",
        "the figures before it were measured in an earlier session and not recorded",
        "but the other four were not recorded",
    ):
        assert passage in README
    for removed in ("Sapphire Rapids", "1.54×", "| 237 |", "2,426", "79 ms at load average", "three runs gave"):
        assert removed not in README
