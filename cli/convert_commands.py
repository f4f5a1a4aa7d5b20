"""`zoo convert`: a timm model (and its checkpoint) becomes a zoo family (zoo.from_timm)."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .common import command


class Order(str, Enum):
    weight = "weight"
    activation = "activation"
    none = "none"


TIMM_NAME = typer.Argument(
    ...,
    help=(
        "A timm model name: resnet18/34/50/101/152, mobilenetv2_*, vit_*_patch*, deit_* (without distillation); "
        "or a transformers causal LM's folder (Llama, Mistral, Qwen2, GPT-2; pip install 'zoo[lm]')."
    ),
)
CHECKPOINT = typer.Option(
    None,
    "--checkpoint",
    help=(
        "Its weights: safetensors, or a PyTorch state dict (read with weights_only=True). Classes, channels and a "
        "ViT's image size are read from its shapes."
    ),
)
ORDER = typer.Option(
    None,
    "--order",
    help=(
        "Importance order of every elastic dimension before nesting: weight (magnitudes), activation (mean "
        "|activation| on --calibrate data), none. Default: activation with --calibrate, else weight."
    ),
)
CALIBRATE = typer.Option(
    None,
    "--calibrate",
    help=(
        "Data for activation importance and for the batch-norm statistics of members below full width (digits, "
        "cifar10:PATH, folder:PATH...). Without it a batch-norm family keeps only its full member."
    ),
)
WIDTH = typer.Option(
    None,
    "--width",
    help=(
        "Member widths (repeatable); default 0.25 0.5 0.75 1 (dense), 1 (low-rank). The full model is always a member."
    ),
)
RANK = typer.Option(None, "--rank", help="Member ranks (repeatable, with --low-rank); default 0.25 0.5 0.75 1.")
LOW_RANK = typer.Option(
    False,
    "--low-rank",
    help=(
        "Factorize the layers zoo's family factorizes, from the SVD of each pretrained matrix (rank 1 is the original "
        "layer)."
    ),
)
IMG_SIZE = typer.Option(
    None,
    "--img-size",
    min=1,
    help="Input size; default: what the checkpoint says (ViTs), else timm's default for the model.",
)
NUM_CLASSES = typer.Option(
    None,
    "--num-classes",
    min=1,
    help="Classes without a checkpoint (default: timm's, 1000); a checkpoint's classifier decides otherwise.",
)
IN_CHANS = typer.Option(None, "--in-chans", min=1, help="Input channels without a checkpoint (default 3).")
OUT = typer.Option(None, "--out", help="The family's weights file (.safetensors).")
SAVE_DIR = typer.Option(
    None,
    "--save-dir",
    help=(
        "Also (or instead) write timm's Hub layout here: config.json + model.safetensors, which "
        "timm.create_model loads as local-dir:DIR with pretrained=True."
    ),
)


@command(
    "convert",
    epilog="Example: zoo convert resnet18 --checkpoint ckpt.safetensors --img-size 32 --calibrate digits "
    "--out family.safetensors",
)
def convert_command(
    timm_name: str = TIMM_NAME,
    checkpoint: Optional[Path] = CHECKPOINT,
    order: Optional[Order] = ORDER,
    calibrate: Optional[str] = CALIBRATE,
    width: Optional[List[float]] = WIDTH,
    rank: Optional[List[float]] = RANK,
    low_rank: bool = LOW_RANK,
    img_size: Optional[int] = IMG_SIZE,
    num_classes: Optional[int] = NUM_CLASSES,
    in_chans: Optional[int] = IN_CHANS,
    out: Optional[Path] = OUT,
    save_dir: Optional[Path] = SAVE_DIR,
) -> None:
    """Turn a timm model and its checkpoint into a family whose full member computes exactly what it computes."""
    if out is None and save_dir is None:
        raise ValueError("give --out FAMILY.safetensors, --save-dir DIR, or both")
    if out is not None and out.is_dir():
        raise ValueError(f"the output {out} is a folder; give a file name (or use --save-dir)")
    if Path(timm_name).is_dir():  # a transformers causal LM's folder: zoo.from_transformers
        if checkpoint is not None or img_size or num_classes or in_chans:
            raise ValueError("--checkpoint, --img-size, --num-classes and --in-chans are for timm models, not a folder")
        return _convert_transformers(Path(timm_name), order, calibrate, width, rank, low_rank, out, save_dir)
    import zoo

    calibration, bundle = None, {}
    if calibrate is not None:
        calibration = _calibration(calibrate, bundle)
    chosen = order.value if order else ("activation" if calibrate else "weight")
    started = time.perf_counter()
    family = zoo.from_timm(timm_name, checkpoint=checkpoint, order=chosen, calibration=calibration,
                           low_rank=low_rank, widths=width or None, ranks=rank or None,
                           num_classes=num_classes, in_chans=in_chans, img_size=img_size)  # fmt: skip
    seconds = time.perf_counter() - started
    metadata = dict(family.zoo_metadata)
    if "data" in bundle:  # what the members' statistics (and the activation order) were measured on
        from training.data import absolute_spec

        data = bundle["data"]
        metadata.update(data=absolute_spec(data.spec), labels=data.labels, mean=list(data.mean), std=list(data.std))
    family.zoo_metadata = metadata
    _report(timm_name, family, chosen, calibrate, seconds)
    if out is not None:
        zoo.save(family, out, metadata=metadata)
        typer.echo(f"wrote {out}")
    if save_dir is not None:
        zoo.save_pretrained(family, save_dir, metadata=metadata)
        typer.echo(
            f"wrote {save_dir} (config.json, model.safetensors): timm.create_model('local-dir:{save_dir}', "
            f"pretrained=True) after `import zoo`"
        )


def _convert_transformers(folder: Path, order, calibrate, width, rank, low_rank: bool, out, save_dir) -> None:
    """`zoo convert FOLDER`: a transformers causal LM (config.json + safetensors), calibrated on
    ``text:PATH`` (pieces of the text, tokenized with the folder's tokenizer.json)."""
    import zoo

    texts = None
    if calibrate is not None:
        if not calibrate.startswith("text:"):
            raise ValueError(f"--calibrate for a language model takes text:PATH, got {calibrate!r}")
        path = Path(calibrate[len("text:") :])
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        text = path.read_text(errors="replace")
        texts = [text[i : i + TEXT_PIECE] for i in range(0, min(len(text), 16 * TEXT_PIECE), TEXT_PIECE)]
    chosen = order.value if order else ("activation" if texts else "weight")
    started = time.perf_counter()
    family = zoo.from_transformers(folder, order=chosen, calibration=texts, low_rank=low_rank, widths=width or None,
                                   ranks=rank or None)  # fmt: skip
    source = family.zoo_metadata["converted_from"]
    seconds = time.perf_counter() - started
    typer.echo(f"converted {folder} ({source['transformers']}) into {family.arch} in {seconds:.1f} s")
    data = f" on {source['calibration_batches']} pieces of {calibrate}" if chosen == "activation" else ""
    typer.echo(f"  order: {chosen}{data}")
    typer.echo(f"  exact: max abs difference {source['max_abs_diff']:.2g} from transformers' logits at full width")
    typer.echo(f"  members: {', '.join(f'{s} ({zoo.count_params(family, s) / 1e6:.2f} M)' for s in family.members)}")
    if out is not None:
        zoo.save(family, out, metadata=family.zoo_metadata)
        typer.echo(f"wrote {out}")
    if save_dir is not None:
        zoo.save_pretrained(family, save_dir, metadata=family.zoo_metadata)
        typer.echo(f"wrote {save_dir} (config.json, model.safetensors)")


TEXT_PIECE = 2000  # characters of --calibrate text per calibration sequence (cut to the context)


def _calibration(spec: str, bundle: dict):
    """Calibration batches of ``spec`` at the model's input size (known once the model is)."""

    def load(input_size: tuple[int, int, int]):
        from training.evaluate import calibration_batches
        from training.model_data import ModelInput, data_for

        data = data_for(ModelInput("the model", "image", input_size), "calibrate", spec)
        bundle["data"] = data
        return calibration_batches(data)

    return load


def _report(name: str, family, order: str, calibrate: Optional[str], seconds: float) -> None:
    import zoo

    source = family.zoo_metadata["converted_from"]
    c, h, _ = family.pretrained_cfg["input_size"]
    where = f"checkpoint {source['checkpoint']}: " if source.get("checkpoint") else ""
    typer.echo(
        f"converted {name} ({where}{family.num_classes} classes, {c} channel(s), {h} px) into {family.arch} in "
        f"{seconds:.1f} s"
    )
    data = f" on {source['calibration_batches']} batches of {calibrate}" if order == "activation" else ""
    recalibrated = len(source["recalibrated"])
    bn = f"; batch norm recalibrated for {recalibrated} member(s) on {calibrate}" if recalibrated else ""
    typer.echo(f"  order: {order}{data}{bn}")
    typer.echo(
        f"  exact: max abs difference {source['max_abs_diff']:.2g} from timm at full width (tolerance "
        f"{zoo.convert.TOLERANCE:g})"
    )
    members = ", ".join(f"{s} ({zoo.count_params(family, s) / 1e6:.2f} M)" for s in family.members)
    typer.echo(f"  members: {members}")
    fixed = source.get("fixed_groups") or []
    if fixed:
        typer.echo(f"  {len(fixed)} channel group(s) its graph cannot map stay at full width (first: {fixed[0]})")
    if family.uses_batchnorm and not calibrate:
        typer.echo(
            "  batch norm: only the full member has statistics; give --calibrate DATA for smaller members (or "
            "recalibrate later, e.g. zoo eval --width)"
        )
