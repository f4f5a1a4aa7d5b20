"""README numbers and the results files they come from: each row names a passage of the README
(whitespace as wrapped there does not matter), the file a script wrote it to (under
benchmarks/results/; the shipped weights' model card weights/README.md; or, for a figure a test
computes or a bound a test holds, that test's file), and where the number is in that file: a
piece of its text, a JSON key path and the digits the README rounds to, or a table row's cells
(`Cells`). A number rewritten in one place and not the other fails here.

Every measured number in the README has a row, except the set-up timings, the table "Measured on
this 2-core CPU" and the suite's time (measured again by whoever edits them), and figures the
README works out from numbers that have rows (a difference, a ratio, a sum). Numbers that are not
measured have none: hyperparameter defaults, flag values in commands, versions, dates. The
Families table's parameter counts come from zoo/catalogue.py (checked against the catalogue by
test_the_families_table_gives_the_catalogues_counts below; tests/test_catalogue.py checks the
catalogue against the real models). Where no file holds a number the README says, next to it,
that it was measured in an earlier session and not recorded."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _path(file: str) -> Path:
    return ROOT / file if file.startswith(("tests/", "weights/")) else RESULTS / file


def _cells(text: str, where: Cells) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {where.prefix}")]
    cells = rows[where.nth][len(where.prefix) + 2 :].strip(" |").split(" | ")[: where.count]
    return where.sep.join(cell.split(" ± ")[0] for cell in cells)


_README_LINES = (ROOT / "README.md").read_text().splitlines()


class Cells(NamedTuple):
    """The first `count` cells after `prefix` on the `nth` table row of the file that starts with
    it, each cell's leading number (`0.926 ± 0.012` gives 0.926), joined by `sep`."""

    prefix: str
    nth: int = 0
    sep: str = " | "
    count: int = 4


def _readme_row(start: str) -> str:
    """The one README table row that starts with `start` as whole cells."""
    rows = [line for line in _README_LINES if line.startswith(f"| {start}") and line[len(start) + 2 :][:1] in " |"]
    if len(rows) != 1:
        raise ValueError(f"{len(rows)} README table rows start with {start!r}")
    return rows[0]


def _same_row(file: str, *starts: str) -> list[tuple[str, str, str]]:
    """README table rows copied whole from the file."""
    return [(_readme_row(start), file, _readme_row(start)) for start in starts]


_POLICIES = ("full", "sam", "extragradient", "meprop", "unit-dropout", "unit-dropout --nested", "full (low-rank)",
             "rank-dropout")  # fmt: skip


def _convert_rows() -> list[tuple[str, str, Cells]]:
    """The README's conversion table (ResNet-18 cells, then ViT-Tiny's) and its low-rank line."""
    table = {
        "converted, `--order none` (BN recalibrated)": "1. converted, naive prefix (--order none) | - | - |",
        "converted, `--order weight`": "2. converted, --order weight | - | - |",
        "converted, `--order activation`": "2. converted, --order activation | - | - |",
        "25 steps joint fine-tuning (`all`) from `activation`":
            "3. K steps joint fine-tuning (all) from activation | 25 | 3 |",
        "25 steps `alternating` from `activation`":
            "3. K steps joint fine-tuning (alternating) from activation | 25 | 3 |",
        "25 steps, the family from scratch (`all`)": "4. family from scratch, K steps (all) | 25 | 3 |",
        "25 steps, each member alone from scratch": "4. each member alone from scratch, K steps | 25 | 3 |",
        "150 steps joint fine-tuning (`all`)": "3. K steps joint fine-tuning (all) from activation | 150 | 3 |",
        "150 steps, the family from scratch (`all`)": "4. family from scratch, K steps (all) | 150 | 3 |",
        "150 steps, each member alone from scratch": "4. each member alone from scratch, K steps | 150 | 3 |",
    }  # fmt: skip
    rows = [(_readme_row(label), "convert/convert.md", Cells(prefix, nth)) for label, prefix in table.items()
            for nth in (0, 1)]  # fmt: skip
    low_rank = {
        "from the SVD without training 0.978 / 0.983 / 0.983 / 0.983": "5. low-rank from SVD, no training | - | - |",
        "after 150 steps joint (`all`) 0.980 / 0.983 / 0.981 / 0.981":
            "5. low-rank, K steps joint fine-tuning (all) | 150 | 3 |",
        "each rank member fine-tuned alone for 150 steps 0.981 / 0.983 / 0.987 / 0.983":
            "5. low-rank, each rank member fine-tuned alone, K steps | 150 | 3 |",
    }  # fmt: skip
    return rows + [(passage, "convert/convert.md", Cells(prefix, sep=" / ")) for passage, prefix in low_rank.items()]


_LM_MEMBERS = {  # the README's label: the evidence table's row
    "full model": 'full `{"width": 1.0}`',
    "width 0.75": 'width 0.75 `{"width": 0.75}`',
    "width 0.5": 'width 0.5 `{"width": 0.5}`',
    "width 0.25": 'width 0.25 `{"width": 0.25}`',
    "depth -2": 'depth -2 `{"blocks": [0, 1, 2, 5]}`',
    "width = depth -2": 'width = depth -2 `{"heads": 0.75, "mlp": 0.6354166666666666}`',
    "depth -4": 'depth -4 `{"blocks": [0, 5]}`',
    "width = depth -4": 'width = depth -4 `{"heads": 0.25, "mlp": 0.3645833333333333}`',
}


def _lm_rows() -> list[tuple]:
    """The README's language-model evidence: its table (parameters, (a), (b), (c) of each member),
    the stand-in's training and the spreads and first try the text quotes."""
    evidence, first = "lm/evidence-K30-lr0.0002.md", "lm/first-try-head-slice-lr5e-4"
    rows = [(_readme_row(label), evidence, Cells(prefix)) for label, prefix in _LM_MEMBERS.items()]
    return rows + [
        ("A plain PyTorch loop trained it for 420 steps of 16 × 129 tokens", "lm/pretrain.json", ("steps", "420")),
        ("the shared machine slowed to 3 to 10 s per step", "lm/pretrain.json", "(3 to 10 s per step)"),
        ("Bits per byte on the first 12,288 held-out tokens", evidence, "Bits per byte on 12288 held-out tokens"),
        ("Across seeds the spread is 0.001 to 0.008", evidence, "| 1.759 ± 0.001 (3) |"),
        ("Across seeds the spread is 0.001 to 0.008", evidence, "| 1.894 ± 0.008 (3) |"),
        ("tie jointly (1.888 against 1.894, spreads 0.007 and 0.008)", evidence, "| 1.888 ± 0.007 (3) |"),
        ("made the full member worse (1.840 joint,", f"{first}/b-joint-K30-s0.json",
         ("scores.full.bits_per_byte", "1.840")),
        ("1.815 alone)", f"{first}/c-alone-full-K30-s0.json", ("scores.full.bits_per_byte", "1.815")),
    ]  # fmt: skip


def _coverage_rows() -> list[tuple[str, str, str]]:
    """The timm coverage count, its refusals per stage and every module's row, copied whole from
    timm_coverage.md (which test_the_coverage_table_is_the_results_files ties to the JSON)."""
    lines = (RESULTS / "timm_coverage.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| module |")]
    total = re.search(r"of the (\d+) timm modules", lines[0]).group(1)
    return [(line, "timm_coverage.md", line) for line in [lines[0], lines[2], *rows]] + [
        (f"({total} in timm", "timm_coverage.md", f"of the {total} timm modules")
    ]


# (README passage, file, text in the file | (JSON key path, value as the README rounds it) | Cells(...))
_ZOO_AFTER = "peers/zoo_members_after_training.json"  # the zoo runs' last evaluations

NUMBERS = [
    *_coverage_rows(),
    # the graph family's training step against its standalone slice (benchmarks/graph_speed.py)
    ("costs 1.10× its standalone slice's step for `resnet10t`", "graph_speed.json", ("0.ratio", "1.10")),
    ("and 1.16× for `efficientnet_b0`", "graph_speed.json", ("1.ratio", "1.16")),
    ("(forward and backward alone: 1.05× and 1.11×)", "graph_speed.json", ("0.ratio_forward_backward", "1.05")),
    ("(forward and backward alone: 1.05× and 1.11×)", "graph_speed.json", ("1.ratio_forward_backward", "1.11")),
    ("`slim_resnet18` measured 1.16× (1.10×) in the same run", "graph_speed.json", ("2.ratio", "1.16")),
    ("`slim_resnet18` measured 1.16× (1.10×)", "graph_speed.json", ("2.ratio_forward_backward", "1.10")),
    # the set-up section's training run and install size (the command's own output, benchmarks/results/setup/)
    ("0.9944 / 1.0000 / 0.9944 / 0.9944 at widths", "setup/train_resnet20.txt", " width=0.75  153,550    0.9944"),
    ("0.9944 / 1.0000 / 0.9944 / 0.9944 at widths", "setup/train_resnet20.txt", " width=0.5    68,642    1.0000"),
    ("600 steps in 132 s with another job", "setup/train_resnet20.txt", "600 steps in 132 s"),
    ("and fills 6.4 GB", "setup/train_resnet20.txt", "site-packages: 6.4G"),
    ("3.2 GB of it are CUDA libraries", "setup/train_resnet20.txt", "nvidia-* and cuda-*: 3.2G"),
    ("and 0.9 GB triton", "setup/train_resnet20.txt", "triton: 897M"),
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
    # latency predicted from `zoo profile` tables (benchmarks/latency_predictor.py)
    *_same_row("latency_predictor.md", "slim_resnet50_64px", "slim_mobilenetv2_64px", "slim_vit_small_64px"),
    *_same_row("latency_predictor_round32.md", "slim_resnet50_64px_round32", "slim_mobilenetv2_64px_round32",
               "slim_vit_small_64px_round32"),  # fmt: skip
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
    ("| uncached | 88 | 11.32 |", "generate.md", "| 88 | 11.32 | 1.00x |"),
    ("| cached | 769 (8.7× uncached) | 1.30 |", "generate.md", "| 769 | 1.30 | 8.70x |"),
    ("A cached byte costs 2.08× a one-byte forward pass with an empty cache (0.63 ms), against 18.1×", "generate.md",
     "0.63 ms. A cached byte costs 2.08x that"),
    ("against 18.1× uncached", "generate.md", "an uncached byte 18.1x"),
    # token generation against transformers (benchmarks/bench_lm_generate.py)
    ("| 1 | 10.7 | 23.7 | 2.22× |", "lm/generate.md", "| 1 | 10.7 | 23.7 | 2.22x |"),
    ("| 2 | 3.0 | 12.9 | 4.23× |", "lm/generate.md", "| 2 | 3.0 | 12.9 | 4.23x |"),
    ("a 32000-token vocabulary: 55.3 M parameters)", "lm/generate.md", "(55.3 M parameters)"),
    ("(load average 13.0 before and 12.0 after)", "lm/generate.md", "load average 13.0 before and 12.0 after"),
    ("16.5 against 31.5 tokens/s at 1 thread, 1.92×", "lm/generate_w05.md", "| 1 | 16.5 | 31.5 | 1.92x |"),
    ("(44.0 M parameters, `--width", "lm/generate_w05.md", "(44.0 M parameters)"),
    ("load 7.8 to 9.4)", "lm/generate_w05.md", "load average 7.8 before and 9.4 after"),
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
    ("load average 5.1 at the end of the recorded run", "data_pipeline.md", "load average 5.1 at the end."),
    ("the same loader varied 1.8× between epochs", "data_pipeline.md",
     "| 214.5 | 137.4, 170.7, 214.5, 182.9, 225.8, 230.8, 247.3 |"),
    ("(0.992×, one process, 1000 of 1000 tensors identical)", "data_pipeline.json",
     ("throughput.same_draws.ratio", "0.992")),
    ("(0.992×, one process, 1000 of 1000 tensors identical)", "data_pipeline.md", "(1000 of 1000 tensors identical)"),
    # the parameter counts of the Families table: test_the_families_table_gives_the_catalogues_counts below
    # timm's own model tests (benchmarks/timm_conformance.sh)
    ("Last run, timm 1.0.31, on all 12 image families", "timm_conformance.md", "# timm 1.0.31 tests/test_models.py"),
    ("49 minutes niced on the 2-core CPU, 28 of them for the low-rank column", "timm_conformance.md",
     "Seconds per column: largest 387, w0.25 198, w0.5 279, w0.75 373, low-rank w0.5 r0.25 1685, sliced smallest 45."),
    *_same_row("timm_conformance.md", "test_model_backward", "test_model_backward_fx", "test_model_default_cfgs",
               "test_model_default_cfgs_non_std", "test_model_features_pretrained", "test_model_forward",
               "test_model_forward_features", "test_model_forward_fx", "test_model_forward_fx_torchscript",
               "test_model_forward_intermediates", "test_model_forward_intermediates_features",
               "test_model_forward_torchscript", "test_model_load_pretrained",
               "test_prune_intermediate_layers_contract", "**all**"),
    # the training loop against a timm-style loop (benchmarks/bench_loop.py)
    *_same_row("loop_resnet20.md", "timm | 269.0", "zoo | 265.3", "zoo-compiled | 179.7", "zoo-joint | 195.2",
               "zoo-joint-compiled | 140.8"),
    *_same_row("loop_gpt_nano.md", "timm | 138.3", "zoo | 137.5", "zoo-compiled | 143.2", "zoo-joint | 117.8",
               "zoo-joint-compiled | 115.2"),
    ("runs at **1.03×** (ResNet-20) and **1.00×** (GPT-nano)", "loop_resnet20.md", "| zoo | 265.3 | 241 | **1.03** |"),
    ("runs at **1.03×** (ResNet-20) and **1.00×** (GPT-nano)", "loop_gpt_nano.md",
     "| zoo | 137.5 | 14,896 | **1.00** |"),
    ("step **1.40×** faster (1.34× for the joint run), after a cold compilation of 28 s for one member's graph",
     "loop_resnet20.md", "| **1.40** | 28.2 |"),
    ("(1.34× for the joint run), after a cold compilation of 28 s for one member's graph and 63 s for two",
     "loop_resnet20.md", "| **1.34** | 62.9 |"),
    ("(medians; 16 to 126 s with the load)", "loop_resnet20.json", ("loops.zoo-compiled.first_steps_s_runs.4", "16")),
    ("(medians; 16 to 126 s with the load)", "loop_resnet20.json",
     ("loops.zoo-joint-compiled.first_steps_s_runs.0", "126")),
    ("(0.96×, 1.00× joint; 14 s and 19 s to compile)", "loop_gpt_nano.md", "| **0.96** | 14.4 |"),
    ("(0.96×, 1.00× joint; 14 s and 19 s to compile)", "loop_gpt_nano.md", "| **1.00** | 19.4 |"),
    # the masked optimizer step (benchmarks/bench_train.py)
    ("step adds 0.79 ms on a width-0.5 core step of ResNet-20 (1.6% of a full training step", "train.md",
     "0.79 ms = 1.6% of a full training step"),
    # update policies (benchmarks/updates.py)
    *_same_row("updates/updates.md", "model | policy", *(f"resnet | {p} |" for p in _POLICIES),
               *(f"gpt | {p} |" for p in _POLICIES)),
    ("every one ends at 99–100% (3 seeds)", "updates/updates.md", "| resnet | unit-dropout | 0.9907 (accuracy"),
    ("reaches 95% of plain training's accuracy within 60–120 steps", "updates/updates.md",
     "| resnet | full | 0.9981 (accuracy, 3 seed(s)) | 120, 90, 90 |"),
    ("(`--eg-lr 0.05`, cos 0.23; one seed's cosine was negative)", "updates/updates.md",
     "| gpt | extragradient | 4.4730 (bits_per_byte, 3 seed(s)) | never, never, never | 0.234 |"),
    ("one seed's cosine was negative", "updates/runs/gpt-extragradient-s0.json", '"alignment_cosine": -0.'),
    ("its loss jumps to 10–14 bpb early", "updates/runs/gpt-extragradient-s0.json", ("curve.0.1", "10")),
    ("its loss jumps to 10–14 bpb early", "updates/runs/gpt-extragradient-s0.json", ("curve.1.1", "14")),
    ("Unit-dropout (cos 0.81) and nested unit-dropout (0.87) trail plain training by 0.16–0.23 bpb",
     "updates/updates.md", "| gpt | unit-dropout | 3.9272 (bits_per_byte, 3 seed(s)) | never, never, 300 | 0.809 |"),
    ("Unit-dropout (cos 0.81) and nested unit-dropout (0.87) trail plain training by 0.16–0.23 bpb",
     "updates/updates.md", "| gpt | unit-dropout --nested | 3.8589 (bits_per_byte, 3 seed(s)) | 300, 300, 300 | 0.870"),
    ("cos 0.90, yet it is the best policy, 3.61 bpb against plain training's 3.70", "updates/updates.md",
     "| gpt | meprop | 3.6132 (bits_per_byte, 3 seed(s)) | 210, 150, 150 | 0.902 |"),
    ("cos 0.90, yet it is the best policy, 3.61 bpb against plain training's 3.70", "updates/updates.md",
     "| gpt | full | 3.6969 (bits_per_byte"),
    *(("(3.65/3.59/3.59 vs 3.75/3.67/3.66)", f"updates/runs/gpt-{policy}-s{seed}.json", ("final", shown))
      for policy, finals in (("meprop", ("3.65", "3.59", "3.59")), ("full", ("3.75", "3.67", "3.66")))
      for seed, shown in enumerate(finals)),
    ("SAM (cos 0.91) is 0.16 bpb behind at equal steps and costs 1.6× the wall time", "updates/updates.md",
     "| gpt | sam | 3.8601 (bits_per_byte, 3 seed(s)) | 300, never, 240 | 0.911 | 1.451 | 192 (7) |"),
    ("SAM (cos 0.91) is 0.16 bpb behind at equal steps and costs 1.6× the wall time", "updates/updates.md",
     "| 1.000 | 1.000 | 121 (5) |"),
    ("keeps 0.974 accuracy at rank 0.25 and 0.987 at 0.5, against 0.501 and 0.974", "updates/updates.md",
     "| 0.9739 / 0.9870 |"),
    ("keeps 0.974 accuracy at rank 0.25 and 0.987 at 0.5, against 0.501 and 0.974", "updates/updates.md",
     "| 0.5009 / 0.9739 |"),
    ("at the same accuracy at rank 1 (0.993)", "updates/updates.md", "| resnet | rank-dropout | 0.9926 (accuracy"),
    ("it is 0.17 bpb behind at rank 1, 0.06 behind at 0.5 and 0.08 ahead at 0.25", "updates/updates.md",
     "| gpt | rank-dropout | 4.2430 (bits_per_byte"),
    ("it is 0.17 bpb behind at rank 1, 0.06 behind at 0.5 and 0.08 ahead at 0.25", "updates/updates.md",
     "| 153 (6) | 4.3919 / 4.3555 |"),
    ("it is 0.17 bpb behind at rank 1, 0.06 behind at 0.5 and 0.08 ahead at 0.25", "updates/updates.md",
     "| gpt | full (low-rank) | 4.0750 (bits_per_byte"),
    ("it is 0.17 bpb behind at rank 1, 0.06 behind at 0.5 and 0.08 ahead at 0.25", "updates/updates.md",
     "| 161 (7) | 4.4737 / 4.2922 |"),
    # the CLI's metadata commands (benchmarks/bench_cli.py)
    ("Each answers in under a second here, against 6 s for `import torch`", "cli.md",
     '| `python -c "import torch"` | 6.08 |'),
    ("torch (load average 4.2–4.7)", "cli.md", "load average 4.2 before and 4.7 after"),
    ("`zoo --help` 0.83 s, `zoo list` 0.92 s", "cli.md", "| `zoo --help` | 0.83 | 0.14 |"),
    ("`zoo --help` 0.83 s, `zoo list` 0.92 s", "cli.md", "| `zoo list` | 0.92 | 0.15 |"),
    ("`zoo info` 0.73–0.79 s", "cli.md", "| `zoo info weights/slim_gpt_nano.safetensors` | 0.73 | 0.12 |"),
    ("`zoo info` 0.73–0.79 s", "cli.md", "| `zoo info slim_vit_tiny --pretrained` | 0.79 | 0.13 |"),
    ("against 6.08 s for `python -c \"import torch\"` (ratios 0.12–0.15) and 13.6 s for `import zoo`", "cli.md",
     '| `python -c "import zoo"` | 13.63 | 2.24 |'),
    # the exported GPT's floored softmax (benchmarks/bench_ort_kernels.py)
    ("on x86 those made a causal softmax 3.8× slower", "ort_kernels.md", "masked with -inf | 0.658 |"),
    ("on x86 those made a causal softmax 3.8× slower", "ort_kernels.md", "floored at max - 80 (zoo) | 0.171 |"),
    # does training the whole space pay (benchmarks/space_search.py)
    ("| ResNet-20, 600 steps | 30 | 0.9665 (0.8603) | 0.9942 (0.9888) | 19 / 9 |", "space/space.md",
     "| uniform | 0.9665 | 0.8603 |"),
    ("| ResNet-20, 600 steps | 30 | 0.9665 (0.8603) | 0.9942 (0.9888) | 19 / 9 |", "space/space.md",
     "| layerwise | 0.9942 | 0.9888 |"),
    ("| ResNet-20, 600 steps | 30 | 0.9665 (0.8603) | 0.9942 (0.9888) | 19 / 9 |", "space/space.md",
     "better on 19 of 30 members, equal on 9."),
    ("| ResNet-20, 150 steps | 30 | 0.9486 (0.8436) | 0.9872 (0.9665) | 26 / 3 |", "space/space.md",
     "| uniform | 0.9486 | 0.8436 |"),
    ("| ResNet-20, 150 steps | 30 | 0.9486 (0.8436) | 0.9872 (0.9665) | 26 / 3 |", "space/space.md",
     "| layerwise | 0.9872 | 0.9665 |"),
    ("| ResNet-20, 150 steps | 30 | 0.9486 (0.8436) | 0.9872 (0.9665) | 26 / 3 |", "space/space.md",
     "better on 26 of 30 members, equal on 3."),
    ("| ViT-Tiny, 80 steps | 20 | 0.9263 (0.8045) | 0.9399 (0.8659) | 13 / 2 |", "space/space.md",
     "| uniform | 0.9263 | 0.8045 |"),
    ("| ViT-Tiny, 80 steps | 20 | 0.9263 (0.8045) | 0.9399 (0.8659) | 13 / 2 |", "space/space.md",
     "| layerwise | 0.9399 | 0.8659 |"),
    ("| ViT-Tiny, 80 steps | 20 | 0.9263 (0.8045) | 0.9399 (0.8659) | 13 / 2 |", "space/space.md",
     "better on 13 of 20 members, equal on 2."),
    ("| GPT-nano, 200 steps (bits/byte) | 16 | 3.215 (3.465) | 3.115 (3.268) | 16 / 0 |", "space/space.md",
     "| uniform | 3.2151 | 3.4652 |"),
    ("| GPT-nano, 200 steps (bits/byte) | 16 | 3.215 (3.465) | 3.115 (3.268) | 16 / 0 |", "space/space.md",
     "| layerwise | 3.1150 | 3.2678 |"),
    ("| GPT-nano, 200 steps (bits/byte) | 16 | 3.215 (3.465) | 3.115 (3.268) | 16 / 0 |", "space/space.md",
     "better on 16 of 16 members, equal on 0."),
    ("(600 steps: 0.9944 everywhere, one member 1.000 → 0.9944;", "space/space.md", "| width=0.5 | 1.0000 | 0.9944 |"),
    ("150 steps: better, 0.9609 → 0.9832 at width 0.25)", "space/space.md", "| width=0.25 | 0.9609 | 0.9832 |"),
    ("0 to 2.2 points on ViT-Tiny", "space/space.md", "| width=0.5 | 0.9777 | 0.9777 |"),
    ("| ResNet-20, 150 steps | 0.3 MFLOPs | 0.9665 / 0.9944 | none is that small (width 0.25: 0.32 MFLOPs) |",
     "space/space.md", "| flops=0.3M | uniform | depth=[3,3,2], width=0.25 | 0.9665 |"),
    ("| ResNet-20, 150 steps | 0.3 MFLOPs | 0.9665 / 0.9944 | none is that small (width 0.25: 0.32 MFLOPs) |",
     "space/space.md", "| flops=0.3M | layerwise | depth=[1,3,1], width=[0.5,0.25,0.25] | 0.9944 |"),
    ("| ResNet-20, 150 steps | 0.3 MFLOPs | 0.9665 / 0.9944 | none is that small (width 0.25: 0.32 MFLOPs) |",
     "space/space.md", "| width=0.25 | 0.9609 | 0.32 MFLOPs |"),
    ("| ResNet-20, 150 steps | 1 MFLOPs | 0.9888 / 0.9944 | width 0.25: 0.9609 / 0.9832 |", "space/space.md",
     "| flops=1M | uniform | depth=[2,2,3], width=0.5 | 0.9888 |"),
    ("| ResNet-20, 150 steps | 1 MFLOPs | 0.9888 / 0.9944 | width 0.25: 0.9609 / 0.9832 |", "space/space.md",
     "| flops=1M | layerwise | depth=[1,2,2], width=[0.5,0.25,0.25] | 0.9944 | 0.298 MFLOPs | width=0.25 | 0.9832 |"),
    ("| ViT-Tiny | 1 M params | 0.8101 / 0.8827 (7 of 12 blocks) | none is that small (width 0.25: 1.50 M) |",
     "space/space.md", "| 0.8101 | 976,330 | none fits |"),
    ("| ViT-Tiny | 1 M params | 0.8101 / 0.8827 (7 of 12 blocks) | none is that small (width 0.25: 1.50 M) |",
     "space/space.md", "| params=1M | layerwise | blocks=[0,6,7,8,9,10,11]"),
    ("| ViT-Tiny | 1 M params | 0.8101 / 0.8827 (7 of 12 blocks) | none is that small (width 0.25: 1.50 M) |",
     "space/space.md", "| 0.8827 | 877,642 | none fits |"),
    ("| ViT-Tiny | 1 M params | 0.8101 / 0.8827 (7 of 12 blocks) | none is that small (width 0.25: 1.50 M) |",
     "space/space.md", "| width=0.25 | 0.9665 | 1,499,722 |"),
    ("| ViT-Tiny | 2 M params | 0.9777 / 0.9777 | width 0.25: 0.9665 / 0.9497 |", "space/space.md",
     "| 0.9777 | 1,622,986 | width=0.25 | 0.9665 |"),
    ("| ViT-Tiny | 2 M params | 0.9777 / 0.9777 | width 0.25: 0.9665 / 0.9497 |", "space/space.md",
     "| 0.9777 | 1,766,218 | width=0.25 | 0.9497 |"),
    ("| GPT-nano | 500 k params | 3.100 / 3.030 bits/byte | rank 0.25, width 1: 3.206 / 3.237 |", "space/space.md",
     "| 3.1003 | 464,896 | rank=0.25, width=1.0 | 3.2062 |"),
    ("| GPT-nano | 500 k params | 3.100 / 3.030 bits/byte | rank 0.25, width 1: 3.206 / 3.237 |", "space/space.md",
     "| 3.0303 | 491,136 | rank=0.25, width=1.0 | 3.2370 |"),
    ("a ResNet-20 with one block per stage at width 0.25 (0.099 MFLOPs", "space/space.md",
     "| flops=0.3M | layerwise | depth=[1,1,1], width=0.25 | 0.9944 | 0.0991 MFLOPs |"),
    ("-15% to +42% for ViT-Tiny members of 2-5 ms", "space/space.md", "3.397 / 2.896 ms (-15%)"),
    ("-2% to +21% for GPT-nano members of 13-24 ms", "space/space.md", "19.840 / 24.090 ms (+21%)"),
    ("-15% to +42% for ViT-Tiny members of 2-5 ms", "space/space.md", "3.594 / 5.091 ms (+42%)"),
    ("chose a member of 0.9721 while the uniform width 0.5 (0.9777) measured 4.8 ms", "space/space.md",
     "| 0.9721 | 3.397 ms | width=0.5 | 0.9777 | 4.802 ms |"),
    # byte-model evaluation (benchmarks/bench_eval.py)
    ("(load average 5.4 before and 4.5 after, medians of 2 repeats: 11% less time;", "eval.md", "--repeats 2"),
    ("heads (about a quarter of the time) and the memory-bound GELU and LayerNorm (about a sixth)", "eval.md",
     "attention 24%, other (GELU, LayerNorm, copies, adds) 18%"),
    # elastic against sliced (benchmarks/bench_elastic.py)
    ("| slim_resnet20 | 0.984 ok | 1.034 ok | 0.439 | 0.253 |", "elastic.md",
     "| 0.984 ok | 1.034 ok | 0.439 | 0.253 |"),
    ("| slim_resnet18 | 0.973 ok | 1.067 ok | 0.303 | 0.265 |", "elastic.md",
     "| 0.973 ok | 1.067 ok | 0.303 | 0.265 |"),
    ("| slim_mobilenetv2 | 1.041 ok | 1.083 ok | 0.467 | 0.316 |", "elastic.md",
     "| 1.041 ok | 1.083 ok | 0.467 | 0.316 |"),
    ("| slim_vit_tiny | 0.999 ok | 1.022 ok | 0.588 | 0.561 |", "elastic.md",
     "| 0.999 ok | 1.022 ok | 0.588 | 0.561 |"),
    ("| slim_gpt_nano | 1.009 ok | 1.015 ok | 0.549 | 0.517 |", "elastic.md",
     "| 1.009 ok | 1.015 ok | 0.549 | 0.517 |"),
    # onnxruntime against PyTorch, whole models (benchmarks/bench_onnx.py) and kernels (benchmarks/bench_ort_kernels.py)
    ("at load average 0.4–0.8;", "onnx.md", "load average 0.4 before and 0.8 after"),
    ("| slim_resnet20 (3x32x32) | 0.34x ok (≤ 0.5) | | | 98% / 0.34x | 0.587 | 0.253 |", "onnx.md",
     "| 0.34x ok (<= 0.5) | 98% / 0.34x | 0.32x | 0.253 | 0.587 |"),
    ("| slim_resnet18 (3x224x224) | 0.54x MISS (≤ 0.5) | | | 99% / 0.53x | 0.289 | 0.266 |", "onnx.md",
     "| 0.54x MISS (<= 0.5) | 99% / 0.53x | 0.42x | 0.266 | 0.289 |"),
    ("| slim_mobilenetv2 (3x224x224) | 0.35x ok (≤ 0.5) | | | 99% / 0.35x | 0.492 | 0.307 |", "onnx.md",
     "| 0.35x ok (<= 0.5) | 99% / 0.35x | 0.30x | 0.307 | 0.492 |"),
    ("| slim_vit_tiny (3x224x224) | 0.82x MISS (≤ 0.35) | 0.93x | 0.44x | 77% / 0.63x | 0.599 | 0.568 |", "onnx.md",
     "| 0.82x | 26.84 | 0.93x | 0.44x | 0.82x MISS (<= 0.35) | 77% / 0.63x | 0.73x | 0.568 | 0.599 |"),
    ("| slim_gpt_nano (256) | 1.04x MISS (≤ 0.35) | 1.12x | 0.77x | 50% / 0.52x | 0.572 | 0.520 |", "onnx.md",
     "| 1.04x | 8.91 | 1.12x | 0.77x | 1.04x MISS (<= 0.35) | 50% / 0.52x | 0.84x | 0.520 | 0.572 |"),
    ("take 0.63× (ViT-Tiny) and 0.52× (GPT-nano) of PyTorch's whole", "onnx.md", "| 77% / 0.63x |"),
    ("take 0.63× (ViT-Tiny) and 0.52× (GPT-nano) of PyTorch's whole", "onnx.md", "| 50% / 0.52x |"),
    ("took 0.66 ms against 0.17 ms with zoo's floor at max − 80 (0.16 ms unmasked)", "ort_kernels.md",
     "| causal softmax 4x256x256, masked with -inf | 0.658 |"),
    ("took 0.66 ms against 0.17 ms with zoo's floor at max − 80 (0.16 ms unmasked)", "ort_kernels.md",
     "| causal softmax 4x256x256, floored at max - 80 (zoo) | 0.171 |"),
    ("took 0.66 ms against 0.17 ms with zoo's floor at max − 80 (0.16 ms unmasked)", "ort_kernels.md",
     "| softmax 4x256x256, no mask | 0.160 |"),
    ("(`MultiHeadAttention` 1.26 ms, `Attention` 1.13 ms;", "ort_kernels.md",
     "MultiHeadAttention unidirectional | 1.263 |"),
    ("(`MultiHeadAttention` 1.26 ms, `Attention` 1.13 ms;", "ort_kernels.md", "ONNX Attention is_causal | 1.126 |"),
    ("zoo's written-out attention 0.75 ms; PyTorch's SDPA 0.58 ms)", "ort_kernels.md",
     "floored masked product (zoo's GPT export) | 0.746 |"),
    ("zoo's written-out attention 0.75 ms; PyTorch's SDPA 0.58 ms)", "ort_kernels.md",
     "causal attention: PyTorch SDPA (is_causal) | 0.582 |"),
    ("- ViT-Tiny: 0.85× → 0.82×.", "onnx.md", "(0.85x against 0.82x PyTorch)"),
    ("(0.33 ms against 0.40 ms for opset 18's MatMul/Softmax/MatMul;", "ort_kernels.md",
     "ONNX Attention (opset 23 export) | 0.334 |"),
    ("(0.33 ms against 0.40 ms for opset 18's MatMul/Softmax/MatMul;", "ort_kernels.md",
     "MatMul, Softmax, MatMul (opset 18 export) | 0.395 |"),
    ("the whole model 23.56 against 24.68 ms", "onnx.md",
     "24.68 ms in onnxruntime against 23.56 ms at the default opset"),
    ("`SkipLayerNormalization` took 0.20 ms where `Add` plus `LayerNormalization` took 0.038 ms", "ort_kernels.md",
     "SkipLayerNormalization (--fuse) | 0.195 |"),
    ("`SkipLayerNormalization` took 0.20 ms where `Add` plus `LayerNormalization` took 0.038 ms", "ort_kernels.md",
     "Add, LayerNormalization | 0.038 |"),
    ("the fused files were slower (ViT 0.93×, GPT 1.12×)", "onnx.md", "| 26.84 | 0.93x |"),
    ("the fused files were slower (ViT 0.93×, GPT 1.12×)", "onnx.md", "| 8.91 | 1.12x |"),
    ("ViT-Tiny 0.44×, GPT-nano 0.77×", "onnx.md", "| 0.93x | 0.44x |"),
    ("ViT-Tiny 0.44×, GPT-nano 0.77×", "onnx.md", "| 1.12x | 0.77x |"),
    # byte generation (benchmarks/bench_generate.py)
    ("(load average 0.7 before and 0.9 after)", "generate.md", "load average 0.7 before and 0.9 after"),
    ("on this AMD EPYC Zen 1 (load", "generate.md", "Machine: AMD EPYC (avx2"),
    ("a cache of 34 to 233 positions", "generate.md", "a cache of 34 to 233 positions"),
    # the training loop against a hand-written loop, and joint steps (benchmarks/bench_train.py)
    ("`zoo train` loop runs at **1.03×** the throughput of a hand-written PyTorch loop", "train.md",
     "| 48.0 | 2664 | **1.03** (throughput"),
    ("alternating 0.81×, random 0.69×, sandwich 2.73×, all 2.68×", "train.md", "| alternating | 38.9 | 0.81 |"),
    ("alternating 0.81×, random 0.69×, sandwich 2.73×, all 2.68×", "train.md", "| random | 33.0 | 0.69 |"),
    ("alternating 0.81×, random 0.69×, sandwich 2.73×, all 2.68×", "train.md", "| sandwich | 131.2 | 2.73 |"),
    ("alternating 0.81×, random 0.69×, sandwich 2.73×, all 2.68×", "train.md", "| all | 128.8 | 2.68 |"),
    # joint against separate training (benchmarks/compare.py)
    ("the GPT rows 8 to 26 minutes", "compare.md", "| 500.6 ± 122.5 |"),
    ("the GPT rows 8 to 26 minutes", "compare.md", "| 1557.9 ± 213.4 |"),
    ("N steps are 2.2 epochs", "byte_baselines.json", '"train_bytes": 943718'),
    ("| core alone, N | 2.480 ± 0.103 | | 501 |", "compare.md", "| 2.480 ± 0.103 | – | 500.6 ± 122.5 |"),
    ("| core alone, 2N | 1.828 ± 0.021 | | 1079 |", "compare.md", "| 1.828 ± 0.021 | – | 1078.9 ± 65.7 |"),
    ("| full alone, N | | 2.552 ± 0.790 | 870 |", "compare.md", "| – | 2.552 ± 0.790 | 870.0 ± 35.4 |"),
    ("| full alone, 2N | | 1.670 ± 0.017 | 1558 |", "compare.md", "| – | 1.670 ± 0.017 | 1557.9 ± 213.4 |"),
    ("| alternating, 2N (N core + N full steps) | **1.969 ± 0.024** | **1.870 ± 0.026** | 927 |", "compare.md",
     "| 1.969 ± 0.024 | 1.870 ± 0.026 | 927.2 ± 134.0 |"),
    ("the jointly trained core is better by 0.51 bpb (1.969 vs 2.480) and the joint run's full model by 0.68 bpb "
     "(1.870 vs 2.552), in each of the 3 seeds", "compare.md",
     "core 1.969 vs 2.480 bpb (better by 0.511; lower in 3 of 3 seeds); full 1.870 vs 2.552 bpb (better by 0.681; "
     "lower in 3 of 3 seeds)"),
    ("the members trained alone win, the core by 0.14 bpb (1.828) and the full model by 0.20 (1.670), in each of the 3 "
     "seeds", "compare.md",
     "core 1.969 vs 1.828 bpb (worse by 0.141; lower in 0 of 3 seeds); full 1.870 vs 1.670 bpb (worse by 0.200; "
     "lower in 0 of 3 seeds)"),
    ("(one joint run of 2N steps, 927 s, against core N + full N trained separately, 1371 s,", "compare.md",
     "(one joint run of 2N steps, 927 s, vs core N + full N separately, 1371 s;"),
    ("after N steps one seed was still at 3.46 bpb (hence ± 0.79), the other two at 2.13 and 2.06", "compare.json",
     "3.462864249397235"),
    ("after N steps one seed was still at 3.46 bpb (hence ± 0.79), the other two at 2.13 and 2.06", "compare.json",
     "2.13455119307423"),
    ("after N steps one seed was still at 3.46 bpb (hence ± 0.79), the other two at 2.13 and 2.06", "compare.json",
     "2.0570891386912775"),
    ("every row was still near the unigram plateau (3.6 to 4.2 bpb)", "gpt-n150/compare.md", "| 3.556 ± 0.512 |"),
    ("every row was still near the unigram plateau (3.6 to 4.2 bpb)", "gpt-n150/compare.md", "| 4.231 ± 0.211 |"),
    ("| each width alone | 49.9 ± 5.9 | 75.6 ± 5.7 | 89.0 ± 2.6 | 93.1 ± 0.6 |", "compare.md",
     "| separate, width 0.25 | 49.9 ± 5.9 |"),
    ("| each width alone | 49.9 ± 5.9 | 75.6 ± 5.7 | 89.0 ± 2.6 | 93.1 ± 0.6 |", "compare.md",
     "| separate, width 0.5 | – | 75.6 ± 5.7 |"),
    ("| each width alone | 49.9 ± 5.9 | 75.6 ± 5.7 | 89.0 ± 2.6 | 93.1 ± 0.6 |", "compare.md",
     "| separate, width 0.75 | – | – | 89.0 ± 2.6 |"),
    ("| each width alone | 49.9 ± 5.9 | 75.6 ± 5.7 | 89.0 ± 2.6 | 93.1 ± 0.6 |", "compare.md",
     "| separate, width 1 | – | – | – | 93.1 ± 0.6 |"),
    *_same_row("compare.md", "alternating | 39.1", "sandwich | 57.4", "all | 81.4"),
    ("| each width alone | 62.8 ± 6.0 | 39.9 ± 10.1 |", "compare.md", "| separate, width 0.5 | 62.8 ± 6.0 |"),
    ("| each width alone | 62.8 ± 6.0 | 39.9 ± 10.1 |", "compare.md", "| separate, width 1 | – | 39.9 ± 10.1 |"),
    *_same_row("compare.md", "alternating | 47.7", "sandwich | 31.7", "all | 67.4"),
    ("seeds differ by up to ±16 points", "compare.md", "| alternating | 47.7 ± 15.7 |"),
    ("(the shipped one, trained with `all` for 800 steps of 64, reaches 97–98%)", "weights/README.md",
     "reached 0.97–0.98 at step 480 and stayed there"),
    # the shipped weights (their model card, weights/README.md, which tests/test_pretrained.py reproduces)
    ("`slim_resnet20` (digits, widths 0.25–1: accuracy 0.994–1.000)", "weights/README.md",
     "| width=0.25 | 17,462 | 0.9944 |"),
    ("`slim_resnet20` (digits, widths 0.25–1: accuracy 0.994–1.000)", "weights/README.md",
     "| width=1 | 272,186 | 1.0000 |"),
    ("`slim_vit_tiny` (digits, widths 0.25–1: accuracy 0.9665–0.9777)", "weights/README.md",
     "| width=0.25 | 1,499,722 | 0.9665 |"),
    ("`slim_vit_tiny` (digits, widths 0.25–1: accuracy 0.9665–0.9777)", "weights/README.md",
     "| width=1 | 5,345,098 | 0.9777 |"),
    ("2.62 bits per byte for the full model, 2.97 for its rank-0.25 core", "weights/README.md",
     "| width=1, rank=1 | 1,153,792 | 2.618 |"),
    ("2.62 bits per byte for the full model, 2.97 for its rank-0.25 core", "weights/README.md",
     "| width=1, rank=0.25 | 367,360 | 2.973 |"),
    *(("(13 MiB in all)", "weights/README.md", heading) for heading in (
        "## slim_resnet20.safetensors (0.55 MiB, float16)", "## slim_vit_tiny.safetensors (10.2 MiB, float16)",
        "## slim_gpt_nano.safetensors (2.2 MiB, float16)")),
    # the backbone snippet's channels and FLOPs, computed by a test
    ("that member's: [128, 256, 512], [64, 128, 256]", "tests/test_readme.py",
     'assert namespace["channels"] == [64, 128, 256]  # the last member\'s, half of [128, 256, 512]'),
    ("# 3.63 and 0.97 GFLOPs", "tests/test_readme.py", "round(full / 1e9, 2) == 3.63 and round(half / 1e9, 2) == 0.97"),
    # bounds the tests hold where the measured figure was not recorded
    ("`tests/test_distributed.py` holds it under 1e-5", "tests/test_distributed.py", "assert diff < 1e-5"),
    ("`tests/test_loop.py` holds it under 1e-5", "tests/test_loop.py", "assert _max_diff(expected, got) < 1e-5"),
    # timm models and checkpoints become families (benchmarks/convert.py)
    ("timm's `resnet18` (1 channel, 400 steps, accuracy 0.989)", "convert/convert.md",
     "Stand-in `resnet18`: 400 steps on 1302 digits at 32 px, accuracy 0.989"),
    ("`vit_tiny_patch16_224` at 32 px (4 patches, 600 steps, 0.983)", "convert/convert.md",
     "Stand-in `vit_tiny_patch16_224`: 600 steps on 1302 digits at 32 px, accuracy 0.983"),
    *_convert_rows(),
    *_lm_rows(),
    ("the recorded differences from timm are 0 (`none`) to 4e-6", "convert/runs/resnet-convert.json",
     "3.814697265625e-06"),
    ("the recorded differences from timm are 0 (`none`) to 4e-6", "convert/runs/resnet-convert.json",
     '"max_abs_diff": 0.0'),
    ("(Wanda's |W| ||X||, per unit), gets 0.821", "convert/convert.md",
     "| 2. ablation: mean abs activation x norm of the reading columns | - | - | 0.257 | 0.821 |"),
    ("a ViT-Tiny trained 600 steps on 1,302 digits", "convert/convert.md", "600 steps on 1302 digits"),
    ("converting takes seconds (1 to 15 s here,", "convert/convert.md", "| 0.777 | 0.922 | 0.922 | 0.983 | 1 |"),
    ("converting takes seconds (1 to 15 s here,", "convert/convert.md", "| 0.257 | 0.821 | 0.972 | 0.989 | 15 |"),
    ("e.g. 439 s per seed for ResNet `all` at 150 steps and 46 s at 25", "convert/convert.md",
     "| 0.998 ± 0.003 | 439 |"),
    ("e.g. 439 s per seed for ResNet `all` at 150 steps and 46 s at 25", "convert/convert.md",
     "| 0.993 ± 0.009 | 46 |"),
    # the README's test command on a clean clone
    ("an earlier run, at 615 s", "setup/ci_suite.txt", "1135 passed, 2 warnings in 614.85s"),
    ("then 1,233 tests passed in 469 s", "setup/ci_run.txt", "1233 passed, 3 warnings in 469.26s"),
    ("493 s with the install", "setup/ci_run.txt", "rc=0 seconds=493"),
    # one file for the family (benchmarks/bench_family_onnx.py)
    ('the family file 102.85 MB against 102.29 MB', 'family_onnx.md',
     "family 102.85 MB, full member's own file 102.29 MB"),
    ('197.44 MB); members at', 'family_onnx.md', 'sum of the per-member files 197.44 MB'),
    ('at 0.93–1.01× their own', 'family_onnx.md', '23.079 | 0.93x'),
    ('at 0.93–1.01× their own', 'family_onnx.md', '97.137 | 1.01x'),
    ('(plain onnxruntime 0.97–1.02×)', 'family_onnx.md', '1.570 | 0.97x'),
    ('(plain onnxruntime 0.97–1.02×)', 'family_onnx.md', '97.678 | 1.02x'),
    ('session 20.0–110.2 MB', 'family_onnx.md', '| 20.0 | 407.8 |'),
    ('session 20.0–110.2 MB', 'family_onnx.md', '| 110.2 | 412.3 |'),
    ("against 262.6 MB for the full member's own file", 'family_onnx.md', '| 262.6 | 110.2 |'),
    ('whole file 412.3 MB', 'family_onnx.md', '| 110.2 | 412.3 |'),
    ('the family file 14.50 MB against 14.19 MB', 'family_onnx.md', "family 14.50 MB, full member's own file 14.19 MB"),
    ('39.23 MB); members at', 'family_onnx.md', 'sum of the per-member files 39.23 MB'),
    ('at 0.97–1.07× their own', 'family_onnx.md', '0.758 | 0.97x'),
    ('at 0.97–1.07× their own', 'family_onnx.md', '1.041 | 1.07x'),
    ('(plain onnxruntime 1.06–1.11×)', 'family_onnx.md', '1.997 | 1.06x'),
    ('(plain onnxruntime 1.06–1.11×)', 'family_onnx.md', '1.081 | 1.11x'),
    ('session 18.3–26.3 MB', 'family_onnx.md', '| 18.3 | 68.9 |'),
    ('session 18.3–26.3 MB', 'family_onnx.md', '| 26.3 | 70.2 |'),
    ("against 45.3 MB for the full member's own file", 'family_onnx.md', '| 45.3 | 26.3 |'),
    ('whole file 70.2 MB', 'family_onnx.md', '| 26.3 | 70.2 |'),
    ('the family file 89.46 MB against 89.71 MB', 'family_onnx.md', "family 89.46 MB, full member's own file 89.71 MB"),
    ('235.81 MB); members at', 'family_onnx.md', 'sum of the per-member files 235.81 MB'),
    ('at 0.66–0.96× their own', 'family_onnx.md', '16.035 | 0.66x'),
    ('at 0.66–0.96× their own', 'family_onnx.md', '3.411 | 0.96x'),
    ('(plain onnxruntime 0.89–1.18×)', 'family_onnx.md', '13.817 | 0.89x'),
    ('(plain onnxruntime 0.89–1.18×)', 'family_onnx.md', '28.479 | 1.18x'),
    ('outputs within 1.7e-06', 'family_onnx.md', '| 1.7e-06 |'),
    ('session 38.7–97.2 MB', 'family_onnx.md', '| 38.7 | 375.2 |'),
    ('session 38.7–97.2 MB', 'family_onnx.md', '| 97.2 | 375.2 |'),
    ("against 123.4 MB for the full member's own file", 'family_onnx.md', '| 123.4 | 97.2 |'),
    ('whole file 375.2 MB', 'family_onnx.md', '| 97.2 | 375.2 |'),
    # Transformers against onnxruntime's own floor (benchmarks/bench_ort_floor.py, bench_ort_int8.py)
    ("| ViT-Tiny | 1 | 1.11x | 1.12x | 0.42x | 0.45x | 0.39x | 0.37x | 0.36x |",
     "ort_floor.md", "| 1.11x | 1.12x | 0.42x | 0.45x | 0.39x | 0.37x | 0.36x |"),
    ("| ViT-Tiny | 8 | 1.12x | 1.20x | 0.72x | 0.82x | 0.77x | 0.73x | 0.67x |",
     "ort_floor.md", "| 1.12x | 1.20x | 0.72x | 0.82x | 0.77x | 0.73x | 0.67x |"),
    ("| GPT-nano | 1 | 1.19x | 1.28x | 0.77x | 0.88x | 0.84x | 0.82x | 0.69x |",
     "ort_floor.md", "| 1.19x | 1.28x | 0.77x | 0.88x | 0.84x | 0.82x | 0.69x |"),
    ("| GPT-nano | 8 | 1.25x | 1.26x | 1.05x | 1.11x | 1.01x | 0.98x | 0.85x |",
     "ort_floor.md", "| 1.25x | 1.26x | 1.05x | 1.11x | 1.01x | 0.98x | 0.85x |"),
    ('(load average 4.5 before and 4.9 after;', 'ort_floor.md',
     'load average 4.5 before and 4.9 after'),
    ('**ViT-Tiny export: met** (1.11×, 1.12×)', 'ort_floor.md',
     '| ViT-Tiny | 8 | 52.76 | 56.54 | 47.16 | 73.29 | 59.88 | 56.73 | 53.87 | 49.27 | 1.12x |'),
    ('**ViT-Tiny export: met** (1.11×, 1.12×)', 'ort_floor.md',
     '| ViT-Tiny | 1 | 9.01 | 9.07 | 8.11 | 21.60 | 9.77 | 8.53 | 7.96 | 7.77 | 1.11x |'),
    ('**GPT-nano export: not met** (1.19×, 1.25×)', 'ort_floor.md',
     '| 23.63 | 25.35 | 19.81 | 30.84 | 27.18 | 25.81 | 25.15 | 21.33 | 1.19x |'),
    ('**GPT-nano export: not met** (1.19×, 1.25×)', 'ort_floor.md',
     '| 213.11 | 215.22 | 170.35 | 203.37 | 224.99 | 205.44 | 200.11 | 172.13 | 1.25x |'),
    ('(1.19× and 1.31× of the floor on the AVX-512 EPYC', 'ort_floor_avx512.md',
     '| 7.85 | 8.77 | 6.62 | 9.07 | 9.93 | 5.71 | 5.15 | 1.19x |'),
    ('(1.19× and 1.31× of the floor on the AVX-512 EPYC', 'ort_floor_avx512.md',
     '| 65.91 | 70.97 | 50.35 | 59.58 | 77.22 | 46.59 | 43.12 | 1.31x |'),
    ('the weight products (53%, 57%) and attention (31%, 32%)', 'ort_floor.md',
     '| GPT-nano | 1 | float32 | 23.91 | MatMul (weights) 12.64 (53%), Attention 7.37 (31%), BiasGelu 1.81 (8%)'),
    ('the weight products (53%, 57%) and attention (31%, 32%)', 'ort_floor.md',
     '| GPT-nano | 8 | float32 | 289.48 | MatMul (weights) 166.13 (57%), Attention 91.53 (32%), BiasGelu 18.56 (6%)'),
    ('the exact GELU 8% and 6%', 'ort_floor.md',
     'Attention 7.37 (31%), BiasGelu 1.81 (8%)'),
    ('the exact GELU 8% and 6%', 'ort_floor.md',
     'Attention 91.53 (32%), BiasGelu 18.56 (6%)'),
    ('(static-matmul 0.39×, dynamic 0.37×)', 'ort_floor.md',
     '| 1.11x | 1.12x | 0.42x | 0.45x | 0.39x | 0.37x |'),
    ("with accuracy 0.9777 → 0.9832", 'ort_floor.md',
     '| ViT-Tiny | accuracy | 0.9777 | 0.9832 (+0.0056) | 0.9832 (+0.0056) | 0.9832 (+0.0056) |'),
    ("bits per byte 2.8897 → 2.8932 (static-matmul) and 2.8924 (dynamic)", 'ort_floor.md',
     '| GPT-nano | bits_per_byte | 2.8897 | 2.8978 (+0.0081) | 2.8932 (+0.0035) | 2.8924 (+0.0027) |'),
    ('the int8 floor itself is 0.67× (ViT-Tiny, batch 8), 0.69× and 0.85× (GPT-nano)', 'ort_floor.md',
     '| 0.73x | 0.67x |'),
    ('the int8 floor itself is 0.67× (ViT-Tiny, batch 8), 0.69× and 0.85× (GPT-nano)', 'ort_floor.md',
     '| 0.82x | 0.69x |'),
    ('the int8 floor itself is 0.67× (ViT-Tiny, batch 8), 0.69× and 0.85× (GPT-nano)', 'ort_floor.md',
     '| 0.98x | 0.85x |'),
    ('45.00 ms against 42.30 ms in float32', 'ort_floor.md',
     '| ViT-Tiny | 8 | int8 dynamic | 53.18 | DynamicQuantizeMatMul 45.00 (85%)'),
    ('45.00 ms against 42.30 ms in float32', 'ort_floor.md',
     '| ViT-Tiny | 8 | float32 | 52.55 | MatMul (weights) 42.30 (80%)'),
    ('0.28× and 0.38× PyTorch for ViT-Tiny and 0.63× and 0.78× for GPT-nano', 'ort_floor_avx512.md',
     '| 1.08x | 1.13x | 0.44x | 0.41x | 0.28x |'),
    ('0.28× and 0.38× PyTorch for ViT-Tiny and 0.63× and 0.78× for GPT-nano', 'ort_floor_avx512.md',
     '| 1.08x | 1.24x | 0.76x | 0.48x | 0.38x |'),
    ('0.28× and 0.38× PyTorch for ViT-Tiny and 0.63× and 0.78× for GPT-nano', 'ort_floor_avx512.md',
     '| 1.19x | 1.33x | 0.87x | 1.09x | 0.63x |'),
    ('0.28× and 0.38× PyTorch for ViT-Tiny and 0.63× and 0.78× for GPT-nano', 'ort_floor_avx512.md',
     '| 1.31x | 1.41x | 1.11x | 1.30x | 0.78x |'),
    ('(bits per byte 2.8978, +0.0081)', 'ort_floor.md',
     '| 2.8897 | 2.8978 (+0.0081) |'),
    ('Dynamic 0.78× / 0.97× (float32 0.78× / 0.95× in that run)', 'ort_int8.md',
     '| dynamic | 2.8924 (+0.0027) | 26.02 | 0.78x | 195.68 | 0.97x |'),
    ('Dynamic 0.78× / 0.97× (float32 0.78× / 0.95× in that run)', 'ort_int8.md',
     '| float32 | 2.8897 (+0.0000) | 26.17 | 0.78x | 191.98 | 0.95x |'),
    ('per-tensor dynamic 0.78× / 0.99×', 'ort_int8.md',
     '| dynamic per-tensor | 2.8922 (+0.0025) | 26.13 | 0.78x | 199.73 | 0.99x |'),
    ('static-matmul 0.83× / 1.06×', 'ort_int8.md',
     '| static-matmul | 2.8932 (+0.0035) | 27.78 | 0.83x | 213.87 | 1.06x |'),
    ('uint8 activations 0.83× / 1.07×', 'ort_int8.md',
     'uint8 activations | 2.8928 (+0.0031) | 27.59 | 0.83x | 215.64 | 1.07x |'),
    ('with int8 activations 1.27× / 1.61×', 'ort_int8.md',
     ' int8 activations | 2.8915 (+0.0018) | 42.47 | 1.27x | 324.73 | 1.61x |'),
    ('`MatMulNBits` 8-bit 1.50× / 1.95× and 4-bit 1.06× / 1.33×', 'ort_int8.md',
     '| MatMulNBits 8-bit | 2.8901 (+0.0004) | 50.30 | 1.50x | 392.52 | 1.95x |'),
    ('`MatMulNBits` 8-bit 1.50× / 1.95× and 4-bit 1.06× / 1.33×', 'ort_int8.md',
     '| MatMulNBits 4-bit | 2.9111 (+0.0214) | 35.32 | 1.06x | 267.17 | 1.33x |'),
    ('(+0.0004 to +0.0214)', 'ort_int8.md',
     '(+0.0004)'),
    ('(+0.0004 to +0.0214)', 'ort_int8.md',
     '(+0.0214)'),
    # zoo against Torch-Pruning and Model Optimizer (benchmarks/peers.py)
    *_same_row("peers/peers.md", *(f"{m} | {t}" for m in ("resnet20", "resnet18") for t in ("0.25", "0.5", "0.75")),
               *(f"{m} | {k}" for m in ("resnet20", "resnet18")
                 for k in ("zoo-uniform", "zoo-search", "tp-magnitude", "tp-taylor", "modelopt")),
               "resnet20 | zoo-lr4-uniform", "resnet18 | zoo-lr4-uniform"),
    ("(starting model: 600 steps from scratch, 91.9%)", "peers/peers.md", "| resnet20 | 600 | 0.1 | 91.9 |"),
    ("ResNet-18 (600 steps, 83.7%), one starting model", "peers/peers.md", "| resnet18 | 600 | 0.05 | 83.7 |"),
    ("AMD EPYC Zen 1, 2 cores shared", "peers/records/resnet18/start/seed0.json", '"cpu": "AMD EPYC"'),
    *(("(84.6 against 90.5, 88.3 against 91.4, 89.0 against 92.2)", "peers/peers.md", cell)
      for cell in ("| 0.25 | zoo-search | 0,1,2 | 84.6 ± 1.5 |", "| 0.25 | tp-magnitude | 0,1,2 | 90.5 ± 0.4 |",
                   "| 0.5 | zoo-search | 0,1,2 | 88.3 ± 0.6 |", "| 0.5 | modelopt | 0,1,2 | 91.4 ± 0.1 |",
                   "| 0.75 | zoo-search | 0,1,2 | 89.0 ± 0.6 |", "| 0.75 | tp-taylor | 0,1,2 | 92.2 ± 0.3 |")),
    *(("(78.9 against 83.3, 79.9 against 85.2, 79.3 against 85.2)", "peers/peers.md", cell)
      for cell in ("| 0.25 | zoo-search | 0,1,2 | 78.9 ± 0.6 |", "| 0.25 | modelopt | 0,1,2 | 83.3 ± 0.4 |",
                   "| 0.5 | zoo-search | 0,1,2 | 79.9 ± 1.6 |", "| 0.5 | modelopt | 0,1,2 | 85.2 ± 0.8 |",
                   "| 0.75 | zoo-search | 0,1,2 | 79.3 ± 1.6 |", "| 0.75 | tp-magnitude | 0,1,2 | 85.2 ± 0.2 |")),
    *(("is at 79.5 / 79.8 / 80.3% (seeds 0 / 1 / 2)", _ZOO_AFTER, f'"accuracy": {a}')
      for a in ("0.795", "0.798", "0.803")),
    *(("went 91.9 → 90.5 / 89.9 / 90.1%", _ZOO_AFTER, f'"accuracy": {a}') for a in ("0.905", "0.899", "0.901")),
    ("(82.5–85.2%, means)", "peers/peers.md", "| 0.25 | tp-taylor | 0,1,2 | 82.5 ± 0.5 |"),
    ("(82.5–85.2%, means)", "peers/peers.md", "| 0.75 | tp-magnitude | 0,1,2 | 85.2 ± 0.2 |"),
    ("82.8 / 87.2 / 89.0% at the three targets", "peers/records/resnet20/zoo-lr4/seed0.json", '"accuracy": 0.828'),
    ("82.8 / 87.2 / 89.0% at the three targets", "peers/records/resnet20/zoo-lr4/seed0.json", '"accuracy": 0.872'),
    ("82.8 / 87.2 / 89.0% at the three targets", "peers/records/resnet20/zoo-lr4/seed0.json", '"accuracy": 0.89,'),
    ("(83.9 / 87.0 / 88.9 at the full lr, seed 0)", "peers/records/resnet20/zoo/seed0.json", '"accuracy": 0.839'),
    ("ResNet-18 77.0 / 78.4 / 80.3% (77.4 / 78.6 / 78.6)", "peers/records/resnet18/zoo-lr4/seed0.json",
     '"accuracy": 0.803'),
    ("ResNet-18 77.0 / 78.4 / 80.3% (77.4 / 78.6 / 78.6)", "peers/records/resnet18/zoo/seed0.json",
     '"accuracy": 0.774'),
    ("its seconds (3248) and latencies (the full model's 12.7 ms)", "peers/peers.md",
     "| 0.75 | zoo-lr4-uniform | 0 | 80.3 ± 0.0 | 8.01M | 55.5M (0.75) | 11.634 (12.679) | 150 / 600 | 3248 |"),
    ("that was 354 s / 516 s (ResNet-20 / ResNet-18; 636 s / 737 s with the three searches) against 318–533 s",
     "peers/peers.md", "| resnet20 | tp-magnitude | 0,1,2 | 450 / 450 | 318 |"),
    ("that was 354 s / 516 s (ResNet-20 / ResNet-18; 636 s / 737 s with the three searches) against 318–533 s",
     "peers/peers.md", "| resnet20 | modelopt | 0,1,2 | 450 / 450 | 533 |"),
    ("that was 354 s / 516 s (ResNet-20 / ResNet-18; 636 s / 737 s with the three searches) against 318–533 s",
     "peers/peers.md", "| resnet18 | zoo-search | 0,1,2 | 150 / 600 | 737 |"),
    ("(ResNet-18: 1.14 / 2.42 / 2.51 ms at the three targets; FastNAS undershoots 0.75, at 0.51 of the FLOPs)",
     "peers/peers.md", "| 0.75 | modelopt | 0,1,2 | 84.8 ± 0.4 | 3.15M | 37.9M (0.51) | 2.506 (5.568) |"),
    ("its 0.75 ResNet-20 models, 3.41–3.64 ms, were slower than the full model timed with them, 2.69–2.79 ms",
     "peers/peers.md", "| 0.75 | tp-magnitude | 0,1,2 | 92.1 ± 0.4 | 199k | 57.3M (0.70) | 3.411 (2.687) |"),
    ("its 0.75 ResNet-20 models, 3.41–3.64 ms, were slower than the full model timed with them, 2.69–2.79 ms",
     "peers/peers.md", "| 0.75 | tp-taylor | 0,1,2 | 92.2 ± 0.3 | 199k | 57.3M (0.70) | 3.642 (2.790) |"),
    ("(ResNet-18 at 0.5 and 0.75: 0.42 and 0.56 of the FLOPs)", "peers/peers.md",
     "| 0.75 | zoo-search | 0,1,2 | 79.3 ± 1.6 | 4.03M | 41.7M (0.56) |"),
    ("(ResNet-18 at 0.5 and 0.75: 0.42 and 0.56 of the FLOPs)", "peers/peers.md",
     "| 0.5 | zoo-search | 0,1,2 | 79.9 ± 1.6 | 2.65M | 31.2M (0.42) |"),
    ("the full model's time across the methods (medians over seeds) shows the load (ResNet-18: 4.5–5.8 ms)",
     "peers/peers.md",
     "| 0.25 | tp-taylor | 0,1,2 | 82.5 ± 0.5 | 2.56M | 17.9M (0.24) | 1.973 (4.455) |"),
    ("the full model's time across the methods (medians over seeds) shows the load (ResNet-18: 4.5–5.8 ms)",
     "peers/peers.md",
     "| 0.25 | zoo-uniform | 0,1,2 | 77.9 ± 0.5 | 2.34M | 17.5M (0.24) | 1.485 (5.819) |"),
]  # fmt: skip


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


README = _flat((ROOT / "README.md").read_text())


@pytest.mark.parametrize("passage, file, where", NUMBERS, ids=[f"{row[1]}:{row[0][:40]}" for row in NUMBERS])
def test_the_readme_number_is_in_its_results_file(passage, file, where):
    assert _flat(passage) in README, f"the README no longer says {passage!r}"
    path = _path(file)
    if isinstance(where, str):
        assert where in path.read_text(), f"{file} does not hold {where!r}"
        return
    if isinstance(where, Cells):
        cells = _cells(path.read_text(), where)
        assert cells in _flat(passage), f"{file} gives {cells!r} on its row {where.prefix!r}"
        return
    key, shown = where
    value = json.loads(path.read_text())
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    decimals = len(shown.partition(".")[2])
    assert f"{value:.{decimals}f}" == shown, (
        f"{file} {key} = {value}, which the README would show as {value:.{decimals}f}"
    )


def test_numbers_the_readme_says_were_not_recorded_are_marked_so():
    """Where no file holds a number, the README says so next to it, and does not give it."""
    for passage in (
        "the figure before it was measured in an earlier session and not recorded",
        "medians of 4 interleaved, measured while making the change and not recorded",
        "but the other four were not recorded",
        "measured paired against unseeded draws in an earlier session and not recorded",
        "to 7.5e-9 (max abs parameter difference, measured in an earlier session and not recorded;",
        "against 1.2e-2 without it (measured in an earlier session and not recorded;",
        "(4 min 40 s here, measured in an earlier session and not recorded;",
        "4.5 s when torch loaded first; measured in an earlier session and not recorded)",
        "13 passed, 52 failed and 1 skipped on zoo's names (measured in an earlier session and not recorded)",
        "(the run above took 80 minutes, measured in an earlier session and not recorded)",
        "7e-7 to 2e-5 here (measured in an earlier session and not recorded)",
        "measured 0 to 1e-6 in an earlier session and not recorded",
        "1 h 45 min of wall time here (measured in an earlier session and not recorded)",
        "the same floor was 0.65× and 0.60× (measured in that session and not recorded)",
        "load average 1 to 7 during the runs, seen in an earlier session and not recorded",
        "(1 MiB) per touched byte (seen in an earlier session and not recorded)",
    ):
        assert passage in README
    for removed in (
        "2,794",
        "Sapphire Rapids",
        "1.54×",
        "| 237 |",
        "2,426",
        "79 ms at load average",
        "three runs gave",
        "(1.00×, one process",
        "adds 0.8 ms",
        "0.966–0.978",
        "13 MB in all",
        "4–9 from other jobs",
    ):
        assert removed not in README


def _catalogue() -> dict[str, dict]:
    """zoo/catalogue.py's MODELS, loaded alone (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("readme_catalogue", ROOT / "zoo" / "catalogue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODELS


def test_the_families_table_gives_the_catalogues_counts():
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| ([\d.]+) M \|.*(?:\(([\d.]+) M at rank 1\.0\)|dense only) \|$",
                      (ROOT / "README.md").read_text(), re.MULTILINE)  # fmt: skip
    models = _catalogue()
    assert sorted(name for name, *_ in rows) == sorted(models)
    for name, family, params, low_rank in rows:
        facts = models[name]
        dense_only = facts["params_low_rank"] is None  # the graph family
        shown = (
            facts["family"],
            f"{facts['params'] / 1e6:.2f}",
            "" if dense_only else f"{facts['params_low_rank'] / 1e6:.2f}",
        )
        assert (family, params, low_rank) == shown, name


def test_the_coverage_table_is_the_results_files():
    """timm_coverage.md is what ``--table`` writes from timm_coverage.json now."""
    spec = importlib.util.spec_from_file_location("timm_coverage", ROOT / "benchmarks" / "timm_coverage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (RESULTS / "timm_coverage.md").read_text() == script.table() + "\n"
