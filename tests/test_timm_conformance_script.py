"""benchmarks/timm_conformance.py in CI, without the package registry: the script's own work
(timm's per-kind lists extended, the conftest that registers and switches zoo's members, one
pytest run per configuration, the JUnit reports read back into the table) on a test file laid
out as timm's tests/test_models.py is, with two of its tests written the way timm writes them.
Running timm's real file, downloaded from the registry, is the slow test in
tests/test_timm_contract.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "timm_conformance.py"
_spec = importlib.util.spec_from_file_location("timm_conformance", SCRIPT)
timm_conformance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timm_conformance)

# timm's layout: the per-kind filter lists the script extends, and tests parametrized over the
# registry; the forward test fails for a model whose classifier is not the requested one.
TIMM_STYLE = textwrap.dedent(
    """
    import pytest
    import timm
    import torch

    FEAT_INTER_FILTERS = [
        'vision_transformer', 'resnet',
    ]
    NON_STD_FILTERS = [
        'vit_*',
    ]

    @pytest.mark.parametrize('model_name', timm.list_models(exclude_filters=NON_STD_FILTERS))
    @pytest.mark.parametrize('batch_size', [1])
    def test_model_forward(model_name, batch_size):
        model = timm.create_model(model_name, pretrained=False, num_classes=7).eval()
        size = model.pretrained_cfg['input_size']
        outputs = model(torch.randn((batch_size, *size)))
        assert outputs.shape == (batch_size, 7) and not torch.isnan(outputs).any()

    @pytest.mark.parametrize('model_name', timm.list_models(exclude_filters=NON_STD_FILTERS))
    def test_model_forward_intermediates(model_name):
        if not any(f in model_name for f in FEAT_INTER_FILTERS):
            pytest.skip('no forward_intermediates')
        model = timm.create_model(model_name, pretrained=False).eval()
        size = model.pretrained_cfg['input_size']
        final, intermediates = model.forward_intermediates(torch.randn((1, *size)))
        assert len(intermediates) > 0 and final.shape[0] == 1
    """
)


@pytest.mark.slow  # ~40 s, three interpreters deep; CI keeps the script's check of timm's file (below)
def test_the_script_runs_timm_style_tests_on_a_member_and_tabulates_them(tmp_path):
    tests = tmp_path / "timm-tests"
    tests.mkdir()
    (tests / "test_models.py").write_text(TIMM_STYLE)
    out = tmp_path / "conformance.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SCRIPT), str(tests), "--configs", "w0.5",
               "--families", "slim_resnet20", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in out.read_text().splitlines()
        if line.startswith("| test_")
    }
    assert rows == {"test_model_forward": "1/0/0", "test_model_forward_intermediates": "1/0/0"}
    assert "Failures:" not in out.read_text() and "Families: slim_resnet20." in out.read_text()


def test_a_changed_timm_test_file_is_refused_by_name(tmp_path):
    (tmp_path / "test_models.py").write_text("NON_STD_FILTERS = [\n]\n")  # FEAT_INTER_FILTERS is gone
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SystemExit, match="timm's test_models.py has changed: 'FEAT_INTER_FILTERS = \\[' is not there"):
        timm_conformance.prepare(tmp_path, work)
