"""The README's Python snippets run as written (every name defined) and leave models ready for
inference, as the text says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(after: str) -> str:
    """The first ```python block after the heading ``after``."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after) :], re.S).group(1)


def test_the_python_api_snippet_runs_and_ends_in_eval_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes small.safetensors
    namespace: dict = {}
    exec(compile(snippet("## Python API"), "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 10)
    assert not namespace["model"].training and not namespace["same"].training
    with torch.no_grad():  # the file holds the member: same outputs as the family at width 0.5
        images = namespace["images"]
        torch.testing.assert_close(namespace["same"](images), namespace["small"].eval()(images))
    assert "training mode" in README.read_text()


def test_the_pretrained_snippet_runs():
    namespace: dict = {}
    exec(compile("import timm, zoo\n" + snippet("## Pretrained families"), "README.md", "exec"), namespace)
    assert not namespace["model"].training and namespace["model"].pretrained_cfg["tag"] == "digits"


def test_loaded_models_start_in_training_mode_as_the_readme_says(tmp_path):
    import zoo

    path = zoo.save(zoo.create_model("slim_resnet20", widths=[1.0]), tmp_path / "m.safetensors")
    assert zoo.create_model("slim_resnet20").training and zoo.load(path).training


def test_the_backbone_snippet_builds_a_pyramid_at_two_members_and_the_channels_shrink():
    namespace: dict = {}
    exec(compile(snippet("### A slimmable backbone"), "README.md", "exec"), namespace)
    shapes = [(1, 64, 28, 28), (1, 64, 14, 14), (1, 64, 7, 7)]
    assert [[tuple(p.shape) for p in namespace["pyramids"][w].values()] for w in (1.0, 0.5)] == [shapes, shapes]
    assert namespace["channels"] == [64, 128, 256]  # the last member's, half of [128, 256, 512]
    full, half = namespace["flops"]
    assert round(full / 1e9, 2) == 3.63 and round(half / 1e9, 2) == 0.97  # the numbers the README gives
