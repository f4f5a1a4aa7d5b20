"""Turn a `zoo train` result into a shipped pretrained family: ``weights/<arch>.safetensors``.

The file is stored in ``--dtype`` (float16 halves it; every floating tensor, batch-norm
statistics included, is rounded), and its recorded metrics are re-measured on the stored
weights, not copied from training: ``metadata["metrics"]`` is exactly what ``zoo eval NAME
--pretrained`` computes (same members, data, split and batch size), and ``metadata["check"]``
holds the metrics on the first ``--check-items`` validation items, which the tests reproduce
quickly. Training's own float32 metrics are kept as ``metadata["train_metrics"]``.

    python scripts/release_weights.py RUN/model.safetensors --command "zoo train ..."
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.model_data import data_for  # noqa: E402
from zoo.members import recorded_members  # noqa: E402

EVAL_BATCH_SIZE = 256  # zoo eval's default: the same batches give the same sums
CHECK_ITEMS = {"image": 256, "tokens": 8}


def release(run_file: Path, command: str, dtype: str, out_dir: Path) -> Path:
    torch.set_num_threads(1)  # CPU reductions in one fixed order (what the tests use too)
    source = zoo.load(run_file)
    metadata = dict(source.zoo_metadata)
    members = recorded_members(source)
    target = out_dir / f"{source.arch}.safetensors"
    with tempfile.TemporaryDirectory() as scratch:
        rounded = zoo.load(zoo.save(source, Path(scratch) / "rounded.safetensors", metadata=metadata, dtype=dtype))
    val = data_for(rounded, "evaluate").val
    check_items = CHECK_ITEMS[rounded.input_kind]
    metadata.update(
        train_metrics=metadata.get("metrics", []),
        metrics=evaluate(rounded, val, members, EVAL_BATCH_SIZE),
        check={"items": check_items, "metrics": evaluate(rounded, val, members, EVAL_BATCH_SIZE, limit=check_items)},
        command=command,
    )
    return zoo.save(rounded, target, metadata=metadata, dtype=dtype)  # already representable: saved unchanged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_file", type=Path, help="model.safetensors written by zoo train")
    parser.add_argument("--command", required=True, help="the zoo train command that made it (recorded in the file)")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "weights")
    args = parser.parse_args(argv)
    path = release(args.run_file, args.command, args.dtype, args.out_dir)
    header = zoo.read_header(path)
    for record in header["metadata"]["metrics"]:
        print(record)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {args.dtype})")


if __name__ == "__main__":
    main()
