"""`zoo profile`: a family's latency table on the device it runs on (what `zoo search --budget
latency=` predicts from instead of measuring every candidate)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .common import PRETRAINED, command, readable_weights


@command("profile", epilog="Example: zoo profile runs/resnet50/model.safetensors --threads 1")
def profile_command(
    weights: str = typer.Argument(
        ..., help="A family's weights file or folder, or a catalogue name with --pretrained."
    ),
    pretrained: bool = PRETRAINED,
    threads: int = typer.Option(1, "--threads", min=1, help="onnxruntime threads (as zoo search --threads)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size measured (zoo search predicts batch 1)."),
    repeats: int = typer.Option(20, "--repeats", min=3, help="Timed runs per block and member (median kept)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for the table; default: the family's own folder (where zoo search finds it)."
    ),
) -> None:
    """Measure every block of the family at every width on this device (onnxruntime): a latency table."""
    path = readable_weights(weights, pretrained, "profile")
    if pretrained and out is None:
        raise ValueError("zoo profile --pretrained needs --out DIR (the shipped weights' folder is not yours to write)")
    folder = out if out is not None else (Path(weights) if Path(weights).is_dir() else path.parent)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; zoo profile writes a table into a folder")
    import zoo
    from export.profile import measure, profile_name, write_profile

    model = zoo.load(path)
    started = time.perf_counter()
    document = measure(model, threads=threads, batch=batch, repeats=repeats, progress=typer.echo)
    folder.mkdir(parents=True, exist_ok=True)
    target = write_profile(document, folder / profile_name(threads, batch))
    blocks = sum(len(unit["ms"]) for unit in document["units"].values())
    typer.echo(
        f"wrote {target}: {len(document['units'])} blocks at {blocks} widths in all, from "
        f"{document['members_measured']} members measured in {time.perf_counter() - started:.0f} s "
        f"({document['device']['cpu']}, {threads} thread{'s' if threads > 1 else ''}, batch {batch})"
    )
