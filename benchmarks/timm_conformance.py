"""Run timm's own model tests (``tests/test_models.py`` of timm's source distribution) against
zoo's image families, at several members, and print passed / failed / skipped per test.

``benchmarks/timm_conformance.sh`` downloads the installed timm version's sdist and calls this
with its ``tests`` folder. The test file is copied unchanged except for two lists in which
timm says which tests apply to which kind of model, where zoo's families are added as timm
adds its own:

* ``NON_STD_FILTERS`` gets ``slim_vit_*``: timm lists its ViTs (``vit_*``) there, so they run the
  Transformer variant of the config test and skip the CNN feature-map tests;
* ``FEAT_INTER_FILTERS`` (module names whose models have ``forward_intermediates``) gets
  ``mobilenetv2`` and ``vit``, zoo's module names; ``resnet`` is timm's and zoo's alike.

Every other filter, skip and input size is timm's. Each member configuration (see
``timm_conformance_conftest.py``, copied as timm's conftest.py) is one pytest run over the tests that name a zoo model::

    python benchmarks/timm_conformance.py TIMM_SDIST/tests [--configs largest,w0.5] [--families slim_resnet20]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name -> ZOO_MEMBER: the family's trained members (the default grid of widths), a low-rank
# member, and the architecture of a sliced member (the smallest layerwise one).
CONFIGS = {
    "largest": {},
    "w0.25": {"width": 0.25},
    "w0.5": {"width": 0.5},
    "w0.75": {"width": 0.75},
    "low-rank w0.5 r0.25": {"low_rank": True, "member": {"width": 0.5, "rank": 0.25}},
    "sliced smallest": {"sliced": "smallest"},
}

# (anchor line in test_models.py, what is added after it, why)
DECLARATIONS = [
    (
        "FEAT_INTER_FILTERS = [\n",
        "    'mobilenetv2', 'vit',  # zoo's families with forward_intermediates (zoo/models/<module>.py)\n",
    ),
    ("NON_STD_FILTERS = [\n", "    'slim_vit_*',  # zoo's ViTs, of the kind timm lists as 'vit_*'\n"),
]


def image_families() -> list[str]:
    """zoo's models in timm's registry (the image families)."""
    code = "import timm, zoo; print(' '.join(n for n in zoo.list_models() if n in timm.list_models()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env=_env())
    return out.stdout.split()


def _env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def prepare(tests: Path, work: Path) -> Path:
    """timm's test_models.py with zoo's families declared in timm's per-kind lists, and the conftest."""
    text = (tests / "test_models.py").read_text()
    for anchor, added in DECLARATIONS:
        if text.count(anchor) != 1:
            raise SystemExit(f"timm's test_models.py has changed: {anchor.strip()!r} is not there once")
        text = text.replace(anchor, anchor + added)
    (work / "test_models.py").write_text(text)
    shutil.copy(HERE / "timm_conformance_conftest.py", work / "conftest.py")
    return work / "test_models.py"


def run(test_file: Path, families: list[str], member: dict, report: Path) -> float:
    expression = " or ".join(families)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-W",
        "ignore",
        "-k",
        expression,
        f"--junitxml={report}",
        test_file.name,
    ]
    start = time.perf_counter()
    subprocess.run(
        cmd,
        cwd=test_file.parent,
        env=_env(ZOO_MEMBER=json.dumps(member)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """test id (``test_model_forward[1-slim_resnet20]``) -> (outcome, first line of the message)."""
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "skipped" if kind == "skipped" else "failed"
                message = (node.get("message") or "").splitlines()[0] if node.get("message") else ""
                break
        results[case.get("name")] = (outcome, message)
    return results


def table(results: dict[str, dict[str, tuple[str, str]]]) -> str:
    """Markdown: one row per timm test, one column per configuration: passed/failed/skipped."""
    configs = list(results)
    counts: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter)
    )
    for config, cases in results.items():
        for case, (outcome, _) in cases.items():
            counts[case.split("[")[0]][config][outcome] += 1
    lines = ["| timm test | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for test in sorted(counts):
        cells = [
            "{passed}/{failed}/{skipped}".format(**{k: counts[test][c][k] for k in ("passed", "failed", "skipped")})
            for c in configs
        ]
        lines.append(f"| {test} | " + " | ".join(cells) + " |")
    totals = [sum((counts[t][c] for t in counts), collections.Counter()) for c in configs]
    lines.append("| **all** | " + " | ".join(f"**{t['passed']}/{t['failed']}/{t['skipped']}**" for t in totals) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", type=Path, help="the tests folder of timm's source distribution")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--families", default=None, help="comma-separated zoo models (default: every image family)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "timm_conformance.md")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    families = args.families.split(",") if args.families else image_families()
    import timm

    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        test_file = prepare(args.tests, Path(tmp))
        for config in configs:
            report = Path(tmp) / f"{re.sub(r'[^a-z0-9.]+', '-', config)}.xml"
            seconds[config] = run(test_file, families, CONFIGS[config], report)
            results[config] = outcomes(report)
            print(
                f"{config}: {collections.Counter(o for o, _ in results[config].values())} in {seconds[config]:.0f} s",
                flush=True,
            )
    failures = sorted(
        {
            (case, config, message)
            for config, cases in results.items()
            for case, (outcome, message) in cases.items()
            if outcome == "failed"
        }
    )
    skips = sorted(
        {
            (case.split("[")[0], message)
            for cases in results.values()
            for case, (outcome, message) in cases.items()
            if outcome == "skipped"
        }
    )
    text = [
        f"# timm {timm.__version__} tests/test_models.py on zoo's image families",
        "",
        f"Families: {', '.join(families)}.",
        "Cells: passed/failed/skipped test cases (one per model, tag and parameter set). Columns: the",
        "family as built (its largest member), switched to each trained width, a low-rank member, and",
        "a sliced member's architecture (benchmarks/timm_conformance_conftest.py).",
        "Seconds per column: " + ", ".join(f"{c} {seconds[c]:.0f}" for c in configs) + ".",
        "",
        table(results),
        "",
        "Skipped (timm's reasons): " + ("; ".join(f"{t}: {m}" for t, m in skips) or "none") + ".",
    ]
    if failures:
        text += ["", "Failures:", ""] + [f"- {case} [{config}]: {message}" for case, config, message in failures]
    args.out.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
