"""benchmarks/timm_coverage.py's bookkeeping: records replace by module, so a ``--redo`` run beside
the full run keeps both runs' records, and the table counts what was recorded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "timm_coverage.py"


def load(tmp_path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location("timm_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "timm_coverage.json")
    return module


def test_a_record_replaces_its_module_and_keeps_the_others(tmp_path, monkeypatch):
    script = load(tmp_path, monkeypatch)
    script._record({"module": "b", "model": "b1", "status": "refused", "stage": "train", "reason": "R: x"})
    script._record({"module": "a", "model": "a1", "status": "ok", "reason": ""})
    # another run wrote its own record meanwhile: the next write re-reads the file
    other = json.loads(script.RESULTS.read_text()) + [{"module": "c", "model": "c1", "status": "ok", "reason": ""}]
    script.RESULTS.write_text(json.dumps(other))
    script._record({"module": "b", "model": "b1", "status": "ok", "reason": ""})
    records = json.loads(script.RESULTS.read_text())
    assert [(r["module"], r["status"]) for r in records] == [("a", "ok"), ("b", "ok"), ("c", "ok")]
    script._record({"module": "d", "model": "d1", "status": "refused", "stage": "export", "reason": "E: y"})
    lines = script.table(total=10).splitlines()
    assert lines[0] == "4 of the 10 timm modules that register models measured; 3 of the 4 pass all three stages (75%)."
    assert lines[2] == "Refused, by the stage that failed: export 1."
    assert lines[-1] == "| d | d1 | refused | export: E: y |"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
