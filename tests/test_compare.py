"""benchmarks/compare.py end to end at its --tiny setting: real training runs, real files."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
from test_data import write_cifar10

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str, title_start: str) -> list[list[str]]:
    """The body rows of the markdown table under the heading that starts with ``title_start``."""
    section = markdown.split(f"## {title_start}", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    end = next((i for i in range(start, len(section)) if not section[i].startswith("|")), len(section))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section[start + 2 : end]]


def finite_cells(row: list[str]) -> list[float]:
    numbers = [float(m) for cell in row[1:] for m in re.findall(r"-?\d+(?:\.\d+)?", cell)]
    assert all(math.isfinite(n) for n in numbers)
    return numbers


@pytest.mark.slow  # 45 s; the seed-merge and CIFAR-file tests run compare.py end to end in CI
def test_tiny_comparison_writes_every_table_and_the_plot(tmp_path):
    compare = load_compare()
    compare.main(["--tiny", "--out", str(tmp_path)])
    markdown = (tmp_path / "compare.md").read_text()
    gpt = table_rows(markdown, "Low-rank slim_gpt_nano")
    assert [row[0].split(",")[0] for row in gpt] == ["separate core (rank 0.25)"] * 2 + [
        "separate full (rank 1)"
    ] * 2 + ["alternating core+full"]
    assert [len(finite_cells(row)) for row in gpt] == [2, 2, 2, 2, 3]  # one seed: a metric per member, a time
    resnet = table_rows(markdown, "slim_resnet20")
    assert [row[0] for row in resnet] == [f"separate, width {w}" for w in ("0.25", "0.5", "0.75", "1")] + [
        "alternating",
        "sandwich",
        "all",
    ]
    assert [len(finite_cells(row)) for row in resnet] == [2] * 4 + [5] * 3
    vit = table_rows(markdown, "slim_vit_tiny")
    assert [row[0] for row in vit] == ["separate, width 0.5", "separate, width 1", "alternating", "sandwich", "all"]
    assert [len(finite_cells(row)) for row in vit] == [2, 2, 3, 3, 3]
    assert "Equal updates per member" in markdown and "zoo train slim_gpt_nano --low-rank" in markdown
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --only re-measures one section and keeps the others from compare.json
    before = json.loads((tmp_path / "compare.json").read_text())
    compare.main(["--tiny", "--only", "resnet", "--out", str(tmp_path)])
    after = json.loads((tmp_path / "compare.json").read_text())
    assert [t["name"] for t in after["tables"]] == ["gpt", "resnet", "vit"]
    assert [c["sections"] for c in after["commands"]] == [["gpt", "vit"], ["resnet"]]
    assert after["tables"][0] == before["tables"][0] and after["tables"][2] == before["tables"][2]
    for row in after["tables"][1]["rows"]:
        (run,) = row["runs"]  # --tiny: one seed
        assert all(0.0 <= v <= 1.0 for v in run["metrics"].values()) and run["wall_s"] > 0

    # --replot rewrites the same tables from compare.json without training
    (tmp_path / "compare.png").unlink()
    markdown = (tmp_path / "compare.md").read_text()
    compare.main(["--replot", "--out", str(tmp_path)])
    assert (tmp_path / "compare.md").read_text() == markdown and (tmp_path / "compare.png").is_file()


def test_bad_flags_exit_with_usage_error(capsys):
    compare = load_compare()
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--seeds", "0"])
    assert exit_info.value.code == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


@pytest.mark.slow  # ~30 s; the script's tables and plot stay in CI (above), CIFAR files in test_data
def test_tiny_resnet_table_on_cifar10_files(tmp_path):
    """--data cifar10:PATH adds the resnet table on that data (a tiny CIFAR-10 in the real format)."""
    cifar10_dir = write_cifar10(tmp_path / "cifar-10-batches-py")
    compare = load_compare()
    tables = compare.main(["--tiny", "--only", "resnet", "--data", f"cifar10:{cifar10_dir}", "--out", str(tmp_path)])
    assert [t.name for t in tables] == ["resnet", "resnet-cifar10"]
    rows = table_rows((tmp_path / "compare.md").read_text(), "slim_resnet20 on cifar10")
    assert [row[0] for row in rows][-3:] == ["alternating", "sandwich", "all"]
    assert [len(finite_cells(row)) for row in rows] == [2] * 4 + [5] * 3


@pytest.mark.slow  # ~30 s, two tiny comparisons; the script end to end stays in CI (the first test above)
def test_seeds_run_in_separate_processes_merge_into_one_table(tmp_path, capsys):
    compare = load_compare()
    for seed in (0, 1):
        compare.main(["--tiny", "--only", "resnet", "--seed", str(seed), "--out", str(tmp_path / f"s{seed}")])
    parts = [json.loads((tmp_path / f"s{seed}" / "compare.json").read_text())["tables"][0] for seed in (0, 1)]

    (table,) = compare.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "both")])
    for row, row0, row1 in zip(table.rows, parts[0]["rows"], parts[1]["rows"]):
        assert row.runs == row0["runs"] + row1["runs"] and [r["seed"] for r in row.runs] == [0, 1]
    markdown = (tmp_path / "both" / "compare.md").read_text()
    assert "--seed 0" in markdown and "--seed 1" in markdown
    assert all("±" in cell for row in table_rows(markdown, "slim_resnet20") for cell in row[1:] if cell != "–")

    with pytest.raises(SystemExit, match="seed 0 of the resnet table is measured twice"):
        compare.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "twice")])
    assert not (tmp_path / "twice").exists()
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--merge", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and "no compare.json in" in capsys.readouterr().err
