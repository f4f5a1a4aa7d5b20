#!/usr/bin/env bash
# timm's own model tests against zoo's image families: downloads the source distribution of the
# installed timm version (its tests/ are not in the wheel), then runs its tests/test_models.py at
# several members of every family and prints passed / failed / skipped per test (see
# benchmarks/timm_conformance.py; the table also goes to benchmarks/results/timm_conformance.md).
#
#   benchmarks/timm_conformance.sh                       # every image family, every configuration
#   benchmarks/timm_conformance.sh --configs largest --families slim_resnet20
#
# Needs the package registry (pip download) and torchvision (timm's fx tests). About 49 minutes
# for the 12 image families and every configuration on a 2-core CPU, 28 of them for the low-rank
# column (every low-rank model timm's tests build runs an SVD per layer).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
version="$("$python" -c 'import importlib.metadata as m; print(m.version("timm"))')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-binary :all: --no-deps "timm==$version" -d "$work"
tar -xzf "$work/timm-$version.tar.gz" -C "$work" "timm-$version/tests"
"$python" "$repo/benchmarks/timm_conformance.py" "$work/timm-$version/tests" "$@"
