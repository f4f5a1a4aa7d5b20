"""`zoo --help` and each command's help as a newcomer reads them, at 80 columns."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
from cli.app import app
from cli.common import WORKFLOW

runner = CliRunner()


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERM": "dumb"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_commands_are_listed_in_workflow_order():
    listed = re.findall(r"^│ (\w+) ", _help().split("Commands")[1], flags=re.M)
    assert listed == list(WORKFLOW)


@pytest.mark.parametrize("name", WORKFLOW)
def test_every_command_has_a_usage_example(name):
    text = " ".join(_help(name).split())
    assert re.search(rf"Example: zoo {name} \S", text), text[:400]


def test_train_options_are_grouped_in_panels():
    text = _help("train")
    panels = re.findall(r"╭─ ([\w ]+?) ─", text)
    assert panels == ["Arguments", "Options", "Members", "Update rule", "Data", "Loop", "Distributed", "Output"]
    sections = dict(zip(panels, re.split(r"╭─ [\w ]+? ─", text)[1:]))
    assert "--width" in sections["Members"] and "--nproc-per-node" in sections["Distributed"]
    assert "--data" in sections["Data"] and "--steps" in sections["Loop"] and "--resume" in sections["Output"]
    assert set(re.findall(r"(--[\w-]+)", sections["Options"])) == {"--out", "--help"}  # every other in a panel


def test_flags_show_no_value_type_and_brackets_survive():
    text = _help("train")
    assert "<bool>" not in text and "<bool>" not in _help("eval") and "<bool>" not in _help()
    assert re.search(r"--low-rank\s+Build the family", text)
    assert "[keep, 1]" in " ".join(text.split())


def test_no_path_in_convert_help_is_cut():
    assert "…" not in _help("convert")
