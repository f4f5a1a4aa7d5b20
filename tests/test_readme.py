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
