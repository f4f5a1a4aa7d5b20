"""`zoo slice`, `zoo info` and `zoo export`: from a family's weights file to a deployable member.

The library does the work (``zoo.slice_file``, ``zoo.WeightsSource``, ``export.onnx_export``);
this module parses flags, loads calibration data with ``training.model_data`` (the export library
never imports training) and prints.

Data for calibration comes from ``--calibrate DATA`` or else the data spec the training run
recorded in the weights file (``metadata["train"]["data"]``, or a top-level ``"data"``).
Batch-norm recalibration and int8 calibration read the training split with augmentation off;
the int8 cost is measured on the validation split.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

from .common import PRETRAINED, check_data_path, command, readable_weights, weights_file, zoo_module
from .members import MEMBER, one_member

if TYPE_CHECKING:  # heavy imports stay inside the commands
    import numpy as np
    import torch

    from training.data import DataBundle
    from zoo import ElasticModel

BN_BATCHES, BN_BATCH_SIZE = 8, 64  # batch-norm recalibration: 512 training examples
QUANT_CALIBRATION_BATCHES, QUANT_BATCH_SIZE = 8, 32  # int8 activation ranges: 256 examples
VALIDATION_BATCHES = 16  # int8 cost: at most 16 validation batches ...
VALIDATION_BATCH_SIZE = {"image": 64, "tokens": 16}  # ... of 64 images or 16 windows


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Quantization(str, Enum):
    int8 = "int8"


def _fraction(name: str):
    """A Typer callback: widths and ranks lie in (0, 1] (exit 2 otherwise)."""

    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not 0.0 < value <= 1.0:
            raise typer.BadParameter(f"{name} must be in (0, 1], got {value:g}")
        return value

    return check


WIDTH = typer.Option(None, "--width", help="Member width in (0, 1]; default: the largest.", callback=_fraction("width"))
RANK = typer.Option(
    None, "--rank", help="Member rank in (0, 1] (low-rank families); default: the largest.", callback=_fraction("rank")
)
FAMILY = typer.Option(
    False,
    "--family",
    help="Write every trained member into one .onnx file, weights stored once; run one with `zoo run --member`.",
)
CALIBRATE = typer.Option(
    None,
    "--calibrate",
    metavar="DATA",
    help="Data spec (digits, stdlib, cifar10:PATH, ...) for batch-norm recalibration and int8 calibration.",
)


class CalibrationData:
    """The data a command calibrates on, loaded on first use (``training.model_data.data_for``)."""

    def __init__(self, given: Optional[str], model: "ElasticModel"):
        from zoo.members import recorded

        self.given = given  # --calibrate; else data_for reads the file's (and says so if it is gone)
        self.spec = given or recorded(getattr(model, "zoo_metadata", {}), "data")
        self.model, self._bundle = model, None

    def bundle(self, why: str) -> "DataBundle":
        if not self.spec:
            raise ValueError(
                f"{why} needs data, and the weights file records none: pass --calibrate DATA (e.g. digits or stdlib)"
            )
        if self._bundle is None:
            from training.model_data import data_for

            self._bundle = data_for(self.model, "calibrate", self.given)
        return self._bundle

    def bn_batches(self) -> Iterator["torch.Tensor"]:
        """Recalibration batches, loaded only if iterated (only untrained members need them)."""
        from training.data import batches

        yield from batches(self.bundle("batch-norm recalibration").train, BN_BATCH_SIZE, limit=BN_BATCHES)

    def quant_calibration(self) -> list["np.ndarray"]:
        from training.data import batches

        return [
            b.numpy()
            for b in batches(self.bundle("int8 calibration").train, QUANT_BATCH_SIZE, limit=QUANT_CALIBRATION_BATCHES)
        ]

    def validation(self) -> list[tuple["np.ndarray", "np.ndarray"]]:
        import torch

        val = self.bundle("measuring the int8 cost").val
        size = VALIDATION_BATCH_SIZE[self.model.input_kind]
        count = min(len(val), VALIDATION_BATCHES * size)
        out = []
        for start in range(0, count, size):
            inputs, targets = zip(*(val[i] for i in range(start, min(start + size, count))))
            out.append((torch.stack(inputs).numpy(), torch.stack(targets).numpy()))
        return out


@command(
    "slice",
    epilog="Example: zoo slice runs/resnet20/model.safetensors --width 0.5 --out small.safetensors; or "
    "zoo slice llama.safetensors --width 0.5 --out small-llama/ (a transformers folder)",
)
def slice_command(
    weights: Path = typer.Argument(
        ..., help="A family's weights file (.safetensors); a catalogue name with --pretrained."
    ),
    pretrained: bool = PRETRAINED,
    width: Optional[float] = WIDTH,
    rank: Optional[float] = RANK,
    member_json: Optional[List[str]] = MEMBER,
    calibrate: Optional[str] = CALIBRATE,
    out: Path = typer.Option(
        ...,
        "--out",
        help="A path ending in .safetensors: zoo's weights file (any family, any member). Anything else is a "
        "folder: a transformers model folder (config.json, model.safetensors, tokenizer files) that "
        "transformers.AutoModelForCausalLM.from_pretrained loads, for language models of a transformers layout "
        "(slim_llama, slim_gpt2) whose blocks share their sizes.",
    ),
) -> None:
    """Write one member as a standalone, physically smaller weights file, or as a transformers folder."""
    weights = readable_weights(weights, pretrained, "slice")
    check_data_path(calibrate, "--calibrate")
    chosen = one_member(member_json, width, rank)
    if out.suffix.lower() != ".safetensors":
        _slice_to_transformers(weights, out, chosen, rank)
        return
    import zoo
    from zoo.weights import file_sha256

    spec = calibrate or _recorded_data(weights)
    calibration = (lambda model: CalibrationData(calibrate, model).bn_batches()) if spec else None  # loaded if needed
    member = zoo.slice_file(weights, out, chosen, rank, calibration, _bn_note(spec))
    params = sum(p.numel() for p in member.model.parameters())
    typer.echo(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {file_sha256(out)[:12]}; "
        f"source {weights.stat().st_size / 1e6:.2f} MB)"
    )
    typer.echo(f"member {member.model.arch} {member.member}: {params:,} parameters")
    if member.recalibrated:
        typer.echo(f"batch-norm statistics recalibrated on {member.metadata['bn_recalibration']['data']}")
    elif calibrate:
        typer.echo(
            f"note: {member.member} is a trained member (or has no batch norm): its statistics were kept, "
            "--calibrate was not needed"
        )
    for entry in member.metadata["metrics"]:
        typer.echo("metrics: " + _metric_text(entry))


def _slice_to_transformers(weights: Path, out: Path, chosen, rank: Optional[float]) -> None:
    """`zoo slice --out DIR`: the member as a transformers folder."""
    import zoo

    member, folder = zoo.slice_to_transformers(weights, out, chosen, rank)
    params = sum(p.numel() for p in member.model.parameters())
    files = ", ".join(["config.json", "model.safetensors", *folder.tokenizer_files])
    typer.echo(f"wrote {out}/ ({files}): a transformers {folder.architecture}")
    typer.echo(f"member {member.model.arch} {member.member}: {params:,} parameters")
    if not folder.tokenizer_files:
        typer.echo("note: the family records no tokenizer; the folder has none")
    if folder.note:
        typer.echo(f"note: {folder.note}")


@command("export", epilog="Example: zoo export runs/resnet20/model.safetensors --width 0.5 --out small.onnx")
def export_command(
    weights: Path = typer.Argument(
        ..., help="A family's (or a sliced member's) weights file; a catalogue name with --pretrained."
    ),
    pretrained: bool = PRETRAINED,
    width: Optional[float] = WIDTH,
    rank: Optional[float] = RANK,
    member_json: Optional[List[str]] = MEMBER,
    all_members: bool = typer.Option(
        False, "--all", help="Export every trained member into the --out folder, with manifest.json."
    ),
    family: bool = FAMILY,
    out: Path = typer.Option(..., "--out", help="The .onnx file to write (a folder with --all)."),
    opset: Optional[int] = typer.Option(
        None, "--opset", min=18, help="ONNX opset (the dynamo exporter needs 18 or later); default: the exporter's."
    ),
    quantize: Optional[Quantization] = typer.Option(
        None, "--quantize", help="int8: static QDQ for CNNs, dynamic for Transformers; reports the accuracy cost."
    ),
    calibrate: Optional[str] = CALIBRATE,
    device: Device = typer.Option(
        Device.cpu, "--device", help="Export for and verify on this execution provider; cuda fails unless it exists."
    ),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip the ONNX checker and the onnxruntime-vs-PyTorch comparison."
    ),
    fuse: bool = typer.Option(
        False,
        "--fuse",
        help="Rewrite residual adds with LayerNorm, and biases with GELU, into onnxruntime's fused kernels "
        "(onnxruntime only; slower on CPU, see export/fusion.py).",
    ),
) -> None:
    """Export a member to a self-contained ONNX file, verified against PyTorch."""
    _check_choice(all_members, family, width is not None or rank is not None or bool(member_json), fuse)
    path = readable_weights(weights, pretrained, "export")
    check_data_path(calibrate, "--calibrate")
    chosen = one_member(member_json, width, rank)
    import zoo
    from export.onnx_export import export_member
    from export.verify import require_device

    require_device(device.value)
    source = zoo.WeightsSource.open(path)
    data = CalibrationData(calibrate, source.model)
    quantization = quantize.value if quantize else None
    options = dict(opset=opset, device=device.value, verify_output=not no_verify, quantize=quantization)
    if family or all_members:
        options.update(_quantization_data(data, source.model, quantize), **({} if family else {"fuse": fuse}))
        _export_every_member(source, out, family, options)
        return
    options["fuse"] = fuse
    member = source.member(chosen, rank, data.bn_batches() if data.spec else None, _bn_note(data.spec))
    if member.recalibrated:
        typer.echo(f"batch-norm statistics recalibrated on {member.metadata['bn_recalibration']['data']}")
    options.update(_quantization_data(data, source.model, quantize))
    typer.echo(export_member(member, out, **options).summary())


def _export_every_member(source, out: Path, family: bool, options: dict) -> None:
    """--family (one file) or --all (one file each, in a folder with its manifest)."""
    if family:
        from export.family_export import export_family

        typer.echo(export_family(source, out, **options).summary())
        return
    from export.onnx_export import export_all

    results, manifest = export_all(source, out, **options)
    for result in results:
        typer.echo(result.summary())
    typer.echo(f"wrote {manifest} ({len(results)} members)")


def _check_choice(all_members: bool, family: bool, one_member_given: bool, fuse: bool) -> None:
    """--all and --family export every trained member (--family into one file, unfused)."""
    if (all_members or family) and one_member_given:
        raise typer.BadParameter(
            f"{'--all' if all_members else '--family'} exports every trained member; "
            "leave out --width, --rank and --member"
        )
    if family and (all_members or fuse):
        raise typer.BadParameter(f"--family does not take {'--all' if all_members else '--fuse'}")


def _bn_note(spec: Optional[str]) -> Optional[str]:
    """How recalibration data is described in the member's metadata."""
    return f"{spec} (training split, no augmentation, up to {BN_BATCHES} batches of {BN_BATCH_SIZE})" if spec else None


def _recorded_data(weights: Path) -> Optional[str]:
    """The data spec a weights file records (what recalibrates an untrained member by default)."""
    from zoo.members import recorded
    from zoo.weights import read_header

    return recorded(read_header(weights).get("metadata") or {}, "data")


def _quantization_data(data: CalibrationData, model: "ElasticModel", quantize: Optional[Quantization]) -> dict:
    if not quantize:
        return {}
    from export.quantize import method_for

    calibration = data.quant_calibration() if method_for(model.uses_batchnorm) == "static" else None
    return {"calibration": calibration, "validation": data.validation()}


@command("info", epilog="Example: zoo info runs/resnet20/model.safetensors --json")
def info_command(
    file: Path = typer.Argument(
        ..., help="A weights file (.safetensors) or an exported .onnx file; a catalogue name with --pretrained."
    ),
    pretrained: bool = PRETRAINED,
    json_output: bool = typer.Option(False, "--json", help="Print the file's whole record as JSON."),
) -> None:
    """Describe a weights file (members, metrics, data, training run) or an exported ONNX file.

    Reads headers only (no torch, no timm), so it answers at once on any file size."""
    file = weights_file(file, pretrained)
    if not file.exists():
        raise FileNotFoundError(f"no such file: {file}")
    if file.is_dir():
        raise IsADirectoryError(f"{file} is a folder, not a weights or ONNX file")
    onnx = file.suffix.lower() == ".onnx"
    if json_output:
        typer.echo(json.dumps(_info_record(file, onnx), indent=2))
        return
    lines = _onnx_info(file) if onnx else _weights_info(file)
    for name, value in lines:
        typer.echo(f"{name:<13}{value}")


def _weights_info(path: Path) -> list[tuple[str, str]]:
    header = zoo_module("header").read_header(path)  # checks the file's size against its tensors
    catalogue, arch = zoo_module("catalogue"), header["arch"]
    catalogue.check_name(arch)
    facts, low_rank = catalogue.MODELS[arch], bool(header["model_args"].get("low_rank"))
    meta = header.get("metadata") or {}
    lines = [
        (
            "file",
            f"{path} ({path.stat().st_size / 1e6:.2f} MB, {header.get('dtype', 'float32')}, "
            f"sha256 {_sha256(path)[:12]})",
        ),
        ("architecture", f"{arch} (family {facts['family']}, {facts['input']} input)"),
        ("axes", ", ".join(catalogue.axes(arch, low_rank))),
        ("space", catalogue.space(arch, low_rank, header["model_args"])),
        (
            "members",
            "; ".join(_member_text(s) for s in header.get("subnets") or [])
            + ("" if facts["batchnorm"] else " (LayerNorm: any member can be sliced)"),
        ),
        ("parameters", f"{header.get('num_params', 0):,}"),
    ]
    converted = meta.get("converted_from")
    if converted:
        checkpoint = f" checkpoint {converted['checkpoint']}" if converted.get("checkpoint") else ""
        lines.append(
            (
                "converted",
                f"from {_source_text(converted)}{checkpoint}, order {converted.get('order')}, "
                f"max abs difference {converted.get('max_abs_diff', 0):.2g}",
            )
        )
    origin = meta.get("sliced_from")
    if origin:
        lines.append(
            (
                "sliced from",
                f"{origin.get('arch')} {_member_text(origin.get('subnet') or {})} of {origin.get('source_path')} "
                f"(sha256 {str(origin.get('source_sha256'))[:12]})",
            )
        )
    if meta.get("bn_recalibration"):
        lines.append(("batch norm", f"recalibrated on {meta['bn_recalibration'].get('data')}"))
    lines += _recorded_lines(meta)
    metrics = meta.get("metrics") or []
    lines += [("metrics", _metric_text(entry)) for entry in metrics] or [("metrics", "none recorded")]
    return lines


def _recorded_lines(meta: dict) -> list[tuple[str, str]]:
    """What the run (or conversion) recorded about its data and itself: data, labels, input
    size, normalisation, the training run and its whole configuration."""
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}

    def recorded(key: str):
        return meta[key] if meta.get(key) is not None else train.get(key)

    lines = []
    if recorded("data"):
        typed = (train.get("config") or {}).get("data")
        lines.append(
            ("data", f"{recorded('data')}" + (f" (given as {typed})" if typed not in (None, recorded("data")) else ""))
        )
    labels = recorded("labels")
    if labels:
        lines.append(
            ("labels", f"{len(labels)}: " + ", ".join(map(str, labels[:20])) + (" ..." if len(labels) > 20 else ""))
        )
    if recorded("input_size"):
        lines.append(("input", " x ".join(map(str, recorded("input_size"))) + " (channels x height x width)"))
    if recorded("seq_len"):
        lines.append(("input", f"{recorded('seq_len')} bytes per window ({recorded('vocab') or 'bytes'})"))
    if recorded("mean") and recorded("std"):
        lines.append(("normalise", f"mean {_numbers(recorded('mean'))}, std {_numbers(recorded('std'))}"))
    if train.get("steps"):
        where = f"{train.get('world_size', 1)} process(es) on {train.get('device', '?')}"
        lines.append(("training", f"{train['steps']} steps ({train.get('epochs')} epochs), {train.get('strategy')}, "
                                  f"seed {train.get('seed')}, {where}, {train.get('wall_time_s')} s"))  # fmt: skip
    config = train.get("config") or {}
    hidden = ("model", "out", "resume")  # not given: None, off, empty (zeros are settings: seed=0)
    shown = {
        k: v for k, v in config.items() if k not in hidden and v is not None and v is not False and v not in ([], "")
    }
    if shown:
        lines.append(("config", ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items())))
    return lines


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _info_record(path: Path, onnx: bool) -> dict:
    """`zoo info --json`: the file's whole record (a weights file's zoo header, an ONNX file's
    zoo metadata and graph signature)."""
    file = {"file": str(path), "size_bytes": path.stat().st_size}
    if not onnx:
        return {**file, "sha256": _sha256(path), **zoo_module("header").read_header(path)}
    from export.onnx_header import read_onnx_header, zoo_record

    header = read_onnx_header(path)
    return {
        **file,
        "producer": f"{header.producer_name} {header.producer_version}".strip(),
        "opsets": {domain or "ai.onnx": version for domain, version in header.opsets},
        "inputs": [str(v) for v in header.inputs],
        "outputs": [str(v) for v in header.outputs],
        "zoo": zoo_record(header, path),
    }


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _onnx_info(path: Path) -> list[tuple[str, str]]:
    from export.onnx_header import read_onnx_header, zoo_record

    header = read_onnx_header(path)
    record = zoo_record(header, path)
    opsets = ", ".join(f"{domain or 'ai.onnx'} {version}" for domain, version in header.opsets)
    quantization = record.get("quantization") or {}
    lines = [
        (
            "file",
            f"{path} ({path.stat().st_size / 1e6:.2f} MB, producer {header.producer_name} {header.producer_version})",
        ),
        ("architecture", f"{record.get('arch')} (family {record.get('family')})"),
        *_family_lines(record),
        ("inputs", "; ".join(map(str, header.inputs))),
        ("outputs", "; ".join(map(str, header.outputs))),
        ("opset", opsets),
        ("parameters", f"{record.get('num_params', 0):,}"),
        ("FLOPs", f"{record.get('flops', 0) / 1e6:,.2f} M per example"),
        (
            "quantized",
            f"{record['quantized']} ({quantization.get('method')})" if record.get("quantized") else "no (float32)",
        ),
        (
            "low-rank",
            f"{record.get('low_rank_layers', {}).get('merged', 0)} merged, "
            f"{record.get('low_rank_layers', {}).get('factorized', 0)} factorized",
        ),
        ("metrics", _metric_text(record["metrics"]) if record.get("metrics") else "none recorded"),
    ]
    if quantization.get("fp32"):
        lines[-1] = ("metrics", lines[-1][1] + f" (this int8 file, in onnxruntime on {_measured_on(quantization)})")
        lines.append(("float32", _metric_text(quantization["fp32"]) + " (the float32 export on the same data)"))
    lines += [("source", f"sha256 {record.get('source_sha256')}"), ("input spec", json.dumps(record.get("input")))]
    if "tokenizer" in header.metadata:  # a converted language model's tokenizer files (export.onnx_export)
        lines.append(("tokenizer", "recorded (zoo run --prompt encodes and decodes with it)"))
    if record.get("labels"):
        lines.append(
            ("labels", ", ".join(map(str, record["labels"][:20])) + (" ..." if len(record["labels"]) > 20 else ""))
        )
    return lines


def _family_lines(record: dict) -> list[tuple[str, str]]:
    """A family file's members (index, key, member, parameters, FLOPs, metric); else the one member."""
    members = record.get("members")
    if not isinstance(members, list) or not members:
        return [("member", _member_text(record.get("subnet") or {}))]
    lines = [("members", f"{len(members)} in one file (zoo run --member KEY; onnxruntime: input 'member' = index), "
                         f"default {_member_text(record.get('subnet') or {})}")]  # fmt: skip
    for entry in members:
        metric = _metric_text(entry["metrics"]) if entry.get("metrics") else "no metric recorded"
        lines.append(
            (
                f"  {entry.get('index')}",
                f"{entry.get('key')}: {_member_text(entry.get('subnet') or {})}, {entry.get('num_params', 0):,} "
                f"parameters, {entry.get('flops', 0) / 1e6:,.2f} MFLOPs, {metric}",
            )
        )
    return lines


def _measured_on(quantization: dict) -> str:
    unit = "bytes" if "bits_per_byte" in quantization["fp32"] else "examples"
    return f"{quantization.get('validation_samples', 0):,} validation {unit}"


def _source_text(converted: dict) -> str:
    """The library and name a family was converted from: timm's model or transformers' folder."""
    library = "transformers" if "transformers" in converted else "timm"
    return f"{library} {converted.get(library)}"


def _member_text(member: dict) -> str:
    """A member as ``str(zoo.Member)`` writes it, without importing torch."""

    def show(v) -> str:
        return (
            f"{v:g}"
            if isinstance(v, float)
            else (str(v) if isinstance(v, int) else "[" + ",".join(f"{x:g}" for x in v) + "]")
        )

    return ", ".join(f"{k}={show(v)}" for k, v in sorted(member.items()) if v is not None) or "largest"


def _metric_text(entry: dict) -> str:
    parts = [_member_text(entry["subnet"]) + ":"] if "subnet" in entry else []
    parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "subnet"]
    return " ".join(parts)
