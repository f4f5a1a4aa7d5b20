"""How fast the commands that only read metadata answer, next to importing torch.

`zoo --help`, `zoo list` and `zoo info` (a weights file, a shipped family by name, an ONNX
file) read data and file headers and import neither torch nor timm. Each is run as a fresh
process, the way a user runs it, interleaved repeat by repeat with ``python -c "import torch"``
and ``python -c "import zoo"`` (what every command cost before), and the medians are compared.

Target: every metadata command under 1.5 s on this machine; reported as a ratio to importing
torch, which does not depend on how busy the machine is in the same way.

    python benchmarks/bench_cli.py [--repeats 7]

Prints a table and writes it to benchmarks/results/cli.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe  # benchmarks/machine.py: the CPU for the results file

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cli.md"
TARGET_S = 1.5
ZOO = [str(Path(sys.executable).with_name("zoo"))]  # the console script of this environment, no shim


def run(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not Path(ZOO[0]).is_file():
        sys.exit(f"no zoo console script beside {sys.executable}; pip install -e . first")
    started, load_before = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        onnx_file = Path(work) / "gpt.onnx"  # an exported file of a few MB
        subprocess.run([*ZOO, "export", "slim_gpt_nano", "--pretrained", "--width", "0.5", "--no-verify",
                        "--out", str(onnx_file)], check=True, stdout=subprocess.DEVNULL, cwd=REPO)  # fmt: skip
        commands = {
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            'python -c "import zoo"': [sys.executable, "-c", "import zoo"],
            "zoo --help": [*ZOO, "--help"],
            "zoo list": [*ZOO, "list"],
            "zoo info weights/slim_gpt_nano.safetensors": [*ZOO, "info", "weights/slim_gpt_nano.safetensors"],
            "zoo info slim_vit_tiny --pretrained": [*ZOO, "info", "slim_vit_tiny", "--pretrained"],
            "zoo info gpt.onnx": [*ZOO, "info", str(onnx_file)],
        }
        for argv in commands.values():  # warm the page cache
            run(argv)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                samples[name].append(run(argv))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    torch_s = medians['python -c "import torch"']
    lines = [
        "# Metadata commands against importing torch",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} "
        f"by `python benchmarks/bench_cli.py --repeats {args.repeats}` "
        f"in {time.time() - started:.0f} s. Machine: {describe()}, 1-minute load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after. "
        f"Each command a fresh process, median of {args.repeats} "
        f"interleaved runs after one warm-up. Target: metadata commands under {TARGET_S} s.",
        "",
        "| command | median s | / import torch | target |",
        "|---|---:|---:|---|",
    ]
    for name, seconds in medians.items():
        metadata = name.startswith("zoo ")
        verdict = ("ok" if seconds < TARGET_S else "MISS") if metadata else "reference"
        lines.append(f"| `{name}` | {seconds:.2f} | {seconds / torch_s:.2f} | {verdict} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
