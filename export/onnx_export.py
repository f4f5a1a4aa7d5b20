"""A family member as one self-contained, verified ONNX file.

The member is sliced out first (a plain network: no slicing ops left in its graph), its
low-rank layers whose dense form is cheaper are merged (:mod:`export.merge`), and PyTorch's
dynamo exporter (``torch.export`` then ONNX translation and the onnxscript optimizer) writes
the graph with a dynamic ``batch`` axis and, for language models, a dynamic ``sequence`` axis.

The file contract (what ``export/runtime.py`` relies on): one input ``input`` (float32
``[batch, C, H, W]`` images or int64 ``[batch, sequence]`` bytes), one output ``logits``, and
model metadata key ``"zoo"`` holding JSON that describes the member (see :func:`zoo_record`).
Language models also take and return the keys and values of earlier positions, as optional
inputs that default to an empty cache (:mod:`export.kv_cache`), and a converted family's
member records its tokenizer files under the metadata key ``"tokenizer"`` (JSON, file name to
text, as :mod:`zoo.tokenizer` keeps them). With ``fuse=True`` attention
and LayerNorm are rewritten into onnxruntime's fused kernels (:mod:`export.fusion`).
Weights are embedded (no external data file) and the file appears only after it passed
verification: it is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

import zoo
from zoo import ElasticModel, Member, SlicedMember, WeightsSource
from zoo.fileio import WriteError, atomic_path, locked_folder
from zoo.members import recorded
from zoo.models.transformer import Attention
from zoo.tokenizer import recorded_tokenizer_files
from zoo.transformers_out import eos_token_ids

from .fusion import describe_fusions, fuse_for_onnxruntime
from .kv_cache import PAST, PRESENT, CachedDecoder, add_empty_cache_defaults, cache_names, onnx_attention
from .merge import describe_merges, merge_low_rank
from .onnx_header import read_onnx_header
from .onnx_header import zoo_record as zoo_record_of
from .quantize import int8_record, method_for, quantization_report, quantize_int8
from .verify import FP32_TOLERANCE, INPUT_NAME, OUTPUT_NAME, check_model, max_abs_difference, require_device, verify

METADATA_KEY = "zoo"
TOKENIZER_KEY = "tokenizer"
MAX_EMBEDDED_BYTES = 2**31 - 2**20  # protobuf's 2 GB limit, with room for the graph itself
QUANTIZE_CHOICES = ("int8",)
MIN_OPSET = 18  # below this the exporter silently writes 18
# From opset 23 the exporter writes scaled_dot_product_attention as ONNX's Attention op, which
# onnxruntime runs as one kernel (ViT-Tiny's attention 0.33 against 0.40 ms as MatMul, Softmax,
# MatMul: benchmarks/bench_ort_kernels.py; the whole model 23.6 against 24.7 ms in bench_onnx.py),
# so it is the default for models with attention. Other models keep the exporter's default.
ATTENTION_OPSET = 23
MIN_CACHED_CONTEXT = 4  # the example needs a past and a sequence of 2 each (1 would be specialised)


@dataclass
class ExportResult:
    """What one export wrote and measured."""

    path: Path
    member: Member
    size_bytes: int
    num_params: int
    flops: int
    max_abs_diff: float | None  # fp32 onnxruntime vs PyTorch; None when not verified
    low_rank_layers: dict[str, list[int]]
    export_seconds: float
    metadata: dict = field(repr=False)
    quantization: dict | None = None

    def summary(self) -> str:
        """A few lines for the terminal."""
        record = self.metadata
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.2f} MB, opset {record['opset']}, "
            f"{self.export_seconds:.1f} s to export)",
            f"member {record['arch']} {self.member}: {self.num_params:,} parameters, "
            f"{self.flops / 1e6:,.2f} MFLOPs per {_unit(record['input'])}",
            "verification: "
            + (
                "skipped (--no-verify)"
                if self.max_abs_diff is None
                else f"max |onnxruntime - PyTorch| = {self.max_abs_diff:.2e} "
                f"(fp32, tolerance {FP32_TOLERANCE:g} of the outputs' scale)"
            ),
            describe_merges(self.low_rank_layers),
        ]
        if record.get("kv_cache"):
            lines.append(
                f"key/value cache: inputs {PAST}.<i>.key|value and outputs {PRESENT}.<i>.key|value "
                f"for {record['kv_cache']} blocks"
            )
        if record.get("fusions") is not None:
            lines.append(describe_fusions(record["fusions"]))
        if self.quantization:
            q = self.quantization
            changes = ", ".join(
                f"{name} {q['fp32'][name]:.4f} -> {q['int8'][name]:.4f} ({delta:+.4f})"
                for name, delta in q["change"].items()
            )
            lines.append(
                f"int8 ({q['method']}): {q['fp32_bytes'] / 1e6:.2f} MB as float32 -> {self.size_bytes / 1e6:.2f} MB; "
                f"on {q['validation_samples']:,} validation {'bytes' if 'bits_per_byte' in q['fp32'] else 'examples'} "
                f"({q['validation_batches']} batches): {changes}"
            )
        return "\n".join(lines)


def _unit(input_record: dict) -> str:
    """What one forward pass of ``zoo.count_flops`` covers."""
    if input_record["kind"] != "tokens":
        return "image"
    return f"{input_record['context_length']}-{'byte' if input_record['vocab_size'] == 256 else 'token'} sequence"


def input_record(model: ElasticModel, metadata: dict) -> dict:
    """How to feed the model: image shape and normalisation, or the token context (and the
    end-of-sequence tokens of a converted language model, where ``zoo run`` stops)."""
    if model.input_kind == "tokens":
        record = {"kind": "tokens", "context_length": model.context_length, "vocab_size": model.num_classes}
        eos = [i for i in eos_token_ids(metadata) if i < model.num_classes]
        return {**record, "eos_token_ids": eos} if eos else record
    cfg = model.pretrained_cfg
    mean, std, crop_pct = recorded(metadata, "mean"), recorded(metadata, "std"), recorded(metadata, "crop_pct")
    record = {
        "kind": "image",
        "shape": list(cfg["input_size"]),
        "mean": [float(m) for m in (mean if mean is not None else cfg["mean"])],
        "std": [float(s) for s in (std if std is not None else cfg["std"])],
    }
    if crop_pct is not None:  # trained on an image folder: evaluated resized to size / crop_pct, centre-cropped
        record["crop_pct"] = float(crop_pct)
    return record


def zoo_record(
    sliced: SlicedMember,
    model: ElasticModel,
    merges: dict[str, list[int]],
    opset: int,
    flops: int,
    quantized: str | None = None,
    fusions: dict[str, int] | None = None,
    kv_cache: int | None = None,
) -> dict:
    """The JSON stored under the ``"zoo"`` metadata key of every exported file.

    ``fusions``: onnxruntime kernels that fusion produced (None: not fused); ``kv_cache``: the
    number of blocks whose keys and values are cache inputs (None: no cache)."""
    metrics = sliced.metadata.get("metrics") or []
    labels = recorded(sliced.metadata, "labels")
    return {
        "arch": model.arch,
        "family": zoo.family_of(model.arch),
        "subnet": sliced.member.to_dict(),
        "input": input_record(model, sliced.metadata),
        "labels": list(labels) if labels else None,
        "metrics": {k: v for k, v in metrics[0].items() if k != "subnet"} if metrics else None,
        "num_params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "source_sha256": sliced.source_sha256,
        "opset": opset,
        "quantized": quantized,
        "low_rank_layers": {
            "merged": sum(c[0] for c in merges.values()),
            "factorized": sum(c[1] - c[0] for c in merges.values()),
        },
        "fusions": fusions,
        "kv_cache": kv_cache,
        "zoo_version": zoo.__version__,
    }


def _export_args(model: ElasticModel, device: str, opset: int | None) -> tuple[torch.nn.Module, tuple, dict]:
    """What to export: the module, an example of batch 2 (1 would be specialised), and the
    exporter's names and dynamic axes. Language models are exported with their cache, their
    attention as ONNX's ``Attention`` op from opset 23 on (:func:`export.kv_cache.onnx_attention`)."""
    batch = torch.export.Dim("batch", min=1)
    if model.input_kind != "tokens":
        return (
            model,
            (model.example_input(2).to(device),),
            dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},)),
        )
    context = model.context_length
    if context < MIN_CACHED_CONTEXT:
        axes = {0: batch} if context < 2 else {0: batch, 1: torch.export.Dim("sequence", min=1, max=context)}
        example = model.example_input(2, seq_len=1 if context < 2 else context)
        return (
            model,
            (example.to(device),),
            dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=(axes,)),
        )
    decoder = CachedDecoder(model, onnx_op=opset is not None and opset >= ATTENTION_OPSET)
    sequence = torch.export.Dim("sequence", min=1, max=context)
    past = torch.export.Dim("past", min=0, max=context - 1)
    example = model.example_input(2, seq_len=context // 2).to(device)
    cache = tuple(torch.zeros(shape, device=device) for shape in decoder.cache_shapes(past=2))
    names = dict(
        input_names=[INPUT_NAME, *cache_names(PAST, decoder.layers)],
        output_names=[OUTPUT_NAME, *cache_names(PRESENT, decoder.layers)],
        dynamic_shapes=({0: batch, 1: sequence}, tuple({2: past} for _ in cache)),
    )
    return decoder, (example, cache), names


def _onnx_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    return self.proj_drop(self.proj(onnx_attention(self, x)[0]))


@contextlib.contextmanager
def attention_as_onnx_op(model: torch.nn.Module):
    """While exporting, ``model``'s attention modules compute through ONNX's ``Attention`` op on
    q, k and v as ``[batch, tokens, width]`` (:func:`export.kv_cache.onnx_attention`) instead of
    SDPA, whose export transposes them to ``[batch, heads, tokens, head_dim]`` and back (with
    this, ViT-Tiny takes 1.11x / 1.12x the time of onnxruntime's own products and attention at
    batch 1 / 8: ``benchmarks/results/ort_floor.md``)."""
    patched = [module for module in model.modules() if isinstance(module, Attention)]
    for module in patched:
        module.forward = types.MethodType(_onnx_attention_forward, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _export_reason(err: BaseException) -> str:
    """One line: the exporter's own cause where its message has an exception summary (its first
    line only says which step failed), without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    lines = [line.strip() for line in text.splitlines()]
    step = lines[0] if lines else type(err).__name__
    if "## Exception summary" in lines:
        after = [line for line in lines[lines.index("## Exception summary") + 1 :] if line]
        if after:  # the root cause first, as "<class 'module.Name'>: message"
            cause = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", after[0])
            step = f"{step.split('. ')[0]}: {cause}"
    return step


try:  # torch's own exporter internals; where they moved, every export builds its table as before
    from torch.onnx._internal.exporter import _registration

    _UNCACHED_FROM_TORCHLIB = _registration.ONNXRegistry.__dict__["from_torchlib"]
except (ImportError, KeyError):
    _registration = None


@functools.cache
def _torchlib_registry(registry_class: type, opset_version: int):
    return _UNCACHED_FROM_TORCHLIB.__func__(registry_class, opset_version=opset_version)


@contextlib.contextmanager
def _registry_built_once():
    """torch.onnx builds its table of ONNX translations from torchlib on every export (1.1-1.8 s
    here, 15% of exporting a ResNet-20 member); it only reads the table unless given custom
    translations, which zoo never passes, so one table per opset serves every export."""
    if _registration is None:
        yield
        return
    _registration.ONNXRegistry.from_torchlib = classmethod(
        lambda cls, opset_version=_registration._constants.TORCHLIB_OPSET: _torchlib_registry(cls, opset_version)
    )
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = _UNCACHED_FROM_TORCHLIB


def _passes_checker(proto: onnx.ModelProto) -> bool:
    """The ONNX checker on the graph in memory (a graph too large to embed is refused later)."""
    if proto.ByteSize() > MAX_EMBEDDED_BYTES:
        return True
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError:
        return False
    return True


def to_onnx(
    model: ElasticModel, opset: int | None = None, device: str = "cpu", fuse: bool = False
) -> tuple[onnx.ModelProto, dict[str, int] | None]:
    """The model's graph through PyTorch's dynamo exporter, weights embedded, optionally fused
    for onnxruntime; and the fused kernels (None when not fused)."""
    if opset is None and any(isinstance(m, Attention) for m in model.modules()):
        opset = ATTENTION_OPSET
    module, example, names = _export_args(model, device, opset)
    quiet = logging.getLogger("onnxscript")  # it logs failed version conversions as tracebacks
    level = quiet.level
    onnx_op = opset is not None and opset >= ATTENTION_OPSET

    def export(optimize: bool) -> onnx.ModelProto:
        attention = attention_as_onnx_op(model) if onnx_op else contextlib.nullcontext()
        with warnings.catch_warnings(), attention, _registry_built_once():
            warnings.simplefilter("ignore")
            options = {"dynamo": True, "verbose": False, "external_data": False, "optimize": optimize}
            return torch.onnx.export(module, example, opset_version=opset, **options, **names).model_proto

    def export_any_attention(optimize: bool) -> onnx.ModelProto:
        try:
            return export(optimize)
        except Exception:
            fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
            if not fused:
                raise
            return _with_explicit_attention(fused, lambda: export(optimize))

    try:
        quiet.setLevel(logging.CRITICAL)
        proto = export_any_attention(optimize=True)
        if not _passes_checker(proto):  # onnxscript's optimizer left a value no node makes (Gemma 4's ViT)
            proto = export_any_attention(optimize=False)  # onnxruntime optimizes the graph when it loads it
    except Exception as err:  # the exporter raises many types; report one line
        raise ValueError(f"torch.onnx.export failed for {model.arch}: {_export_reason(err)}") from None
    finally:
        quiet.setLevel(level)
    fusions = None
    if fuse:
        proto, fusions = fuse_for_onnxruntime(proto)
    return add_empty_cache_defaults(proto), fusions


def _with_explicit_attention(fused: list, export):
    """Export again with timm's attention written out (``fused_attn = False``: products and a
    softmax) where its fused ``scaled_dot_product_attention`` did not export (the exporter takes
    only four-axis queries; Hiera's have five). Same function, verified like any export."""
    try:
        for m in fused:
            m.fused_attn = False
        return export()
    finally:
        for m in fused:
            m.fused_attn = True


def _opset_of(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _without_unused_opsets(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the opset imports that onnxruntime's optimizer declares but no node uses."""
    used = {node.domain for node in proto.graph.node} | {"", "ai.onnx"} | {f.domain for f in proto.functions}
    for function in proto.functions:
        used |= {node.domain for node in function.node}
    kept = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


def _save(
    proto: onnx.ModelProto, path: Path, record: dict, tokenizer: dict[str, str] | None = None, what: str | None = None
) -> None:
    """Write ``proto`` with its zoo record (and a language model's tokenizer files, metadata key
    ``tokenizer``, what ``export/runtime.py`` decodes with) as one self-contained file (``what`` it
    holds, in words: by default the record's member)."""
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(record))
    if tokenizer:
        proto.metadata_props.add(key=TOKENIZER_KEY, value=json.dumps(tokenizer))
    proto.producer_name, proto.producer_version = "zoo", zoo.__version__
    what = what or f"member {Member.from_dict(record['subnet'])}"
    proto.doc_string = (
        f"{record['arch']} {what} exported by zoo {zoo.__version__} "
        f"with torch {torch.__version__.split('+')[0]}'s dynamo ONNX exporter; see the 'zoo' metadata"
    )
    if proto.ByteSize() > MAX_EMBEDDED_BYTES:
        raise ValueError(
            f"{record['arch']} is too large ({proto.ByteSize() / 2**30:.1f} GiB) to embed its weights in one ONNX file"
        )
    try:
        onnx.save_model(proto, str(path))
    except OSError as err:  # the work folder's disk (the system's temporary folder) refused the write
        raise WriteError(Path(path), err) from None


def export_member(
    sliced: SlicedMember,
    out: str | os.PathLike,
    *,
    opset: int | None = None,
    device: str = "cpu",
    verify_output: bool = True,
    quantize: str | None = None,
    calibration: list[np.ndarray] | None = None,
    validation: list[tuple[np.ndarray, np.ndarray]] | None = None,
    fuse: bool = False,
) -> ExportResult:
    """Export a sliced member to ``out``; verify it; optionally quantize it to int8.

    The member's low-rank layers whose dense form is cheaper are merged in place first;
    ``fuse`` rewrites the graph into onnxruntime's fused Transformer kernels.
    ``calibration`` (input batches) feeds static int8 calibration and ``validation``
    ((inputs, targets) batches) measures what int8 costs. ``out`` appears only on success.
    """
    require_device(device)
    if Path(out).is_dir():
        raise ValueError(f"the output {out} is a folder; give a file name (or export every member with --all)")
    if opset is not None and not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"opset must be between {MIN_OPSET} (the dynamo exporter's lowest) "
            f"and {onnx.defs.onnx_opset_version()} (this onnx's newest), got {opset}"
        )
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize and device != "cpu":
        raise ValueError(
            "int8 export targets onnxruntime's CPU execution provider; use --device cpu with --quantize int8"
        )
    if quantize and not validation:
        raise ValueError(
            "--quantize int8 reports its accuracy cost on validation data; give data with --calibrate DATA"
        )
    model = sliced.model.eval()
    merges = merge_low_rank(model)
    flops = zoo.count_flops(model, batch_size=1)
    model = model.to(device)
    started = time.perf_counter()
    proto, fusions = to_onnx(model, opset, device, fuse)
    export_seconds = time.perf_counter() - started
    if opset is not None and _opset_of(proto) != opset:
        raise ValueError(f"the exporter wrote opset {_opset_of(proto)}, not the requested {opset}")
    cached_blocks = sum(i.name.startswith(PAST + ".") and i.name.endswith(".key") for i in proto.graph.input)
    record = zoo_record(sliced, model, merges, _opset_of(proto), flops, fusions=fusions, kv_cache=cached_blocks or None)
    tokenizer = recorded_tokenizer_files(sliced.metadata)

    with tempfile.TemporaryDirectory(prefix="zoo-export-") as work:
        fp32_path = Path(work) / "model.onnx"
        _save(proto, fp32_path, record, tokenizer)
        diff = verify(model, fp32_path, device) if verify_output else None
        final, report = fp32_path, None
        if quantize:
            method = method_for(model.uses_batchnorm)
            int8_path = Path(work) / "model.int8.onnx"
            quantize_int8(fp32_path, int8_path, method, calibration)
            report = quantization_report(
                fp32_path, int8_path, method, model.input_kind, calibration if method == "static" else None, validation
            )
            report["int8_max_abs_diff"] = max_abs_difference(model, int8_path, "cpu").max_abs  # informative, not gated
            record = int8_record(record, quantize, report)
            _save(_without_unused_opsets(onnx.load(str(int8_path))), int8_path, record, tokenizer)
            check_model(int8_path)
            final = int8_path
        with atomic_path(out) as tmp:
            shutil.copyfile(final, tmp)
    model.cpu()
    return ExportResult(
        Path(out),
        sliced.member,
        Path(out).stat().st_size,
        record["num_params"],
        flops,
        diff,
        merges,
        export_seconds,
        record,
        report,
    )


def export_file(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    width: float | None = None,
    rank: float | None = None,
    *,
    bn_calibration: Iterable[torch.Tensor] | None = None,
    calibration_source: str | None = None,
    **options,
) -> ExportResult:
    """Slice one member of the family in ``weights`` and export it (options: export_member's)."""
    require_device(options.get("device", "cpu"))
    member = WeightsSource.open(weights).member(width, rank, bn_calibration, calibration_source)
    return export_member(member, out, **options)


def export_all(
    weights: str | os.PathLike | WeightsSource,
    out_dir: str | os.PathLike,
    members: Iterable[Member] | None = None,
    **options,
) -> tuple[list[ExportResult], Path]:
    """Export every trained member (or ``members``) into ``out_dir`` plus ``manifest.json``.

    The folder is locked meanwhile (``zoo.fileio.locked_folder``): a run or another export
    writing into it at the same time is refused, not mixed in.
    """
    require_device(options.get("device", "cpu"))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--all writes a folder, but {out_dir} is a file")
    source = weights if isinstance(weights, WeightsSource) else WeightsSource.open(weights)
    with locked_folder(out_dir, "zoo export --all"):
        return export_members(source, out_dir, list(source.model.members if members is None else members), **options)


def export_members(
    source: WeightsSource,
    out_dir: Path,
    members: list[Member],
    names: dict[str, str] | None = None,
    metrics: dict[str, dict] | None = None,
    **options,
) -> tuple[list[ExportResult], Path]:
    """``export_all`` for a caller that already holds ``out_dir``'s lock (``zoo search``).

    ``names``: file names by member key (default ``ARCH_KEY.onnx``); ``metrics``: by member key,
    what the caller measured for a member the weights file has no metrics for (a searched one)."""
    results = []
    for chosen in members:
        member = source.member(chosen)
        if not member.metadata.get("metrics") and chosen.key in (metrics or {}):
            member.metadata["metrics"] = [{"subnet": chosen.to_dict(), **metrics[chosen.key]}]
        name = (names or {}).get(chosen.key, f"{source.model.arch}_{chosen.key}.onnx")
        results.append(export_member(member, out_dir / name, **options))
    manifest = {
        "arch": source.model.arch,
        "family": zoo.family_of(source.model.arch),
        "source_sha256": source.sha256,
        "source_path": str(source.path.resolve()),
        "members": [
            {
                "file": r.path.name,
                "member": r.member.to_dict(),
                "parameters": r.num_params,
                "flops": r.flops,
                "metric": r.metadata["metrics"],
                "size_bytes": r.size_bytes,
                "quantized": r.metadata["quantized"],
                "max_abs_diff": r.max_abs_diff,
            }
            for r in results
        ],
    }
    manifest_path = out_dir / "manifest.json"
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return results, manifest_path


def read_record(path: str | os.PathLike) -> dict:
    """The zoo record of an exported file (ValueError for a foreign or corrupt file), read
    without parsing the graph (:mod:`export.onnx_header`)."""
    return zoo_record_of(read_onnx_header(path), path)
