"""Every trained member of a family in one verified ONNX file, its weights stored once.

Each member is sliced and exported as for its own file, but with batch norm left as
``BatchNormalization`` (the exporter's optimizer would fold each member's own statistics into
its conv weights, which would then share nothing; onnxruntime folds them when a session
starts) and with low-rank layers kept factorized (a merged ``u @ v`` is no prefix of anything).
:mod:`export.family_graph` then joins the graphs over the largest member's initializers.

The file: input ``input``, optional int64 input ``member`` (the member's ``index``; default: the
largest member), output ``logits``; the zoo record of the largest member plus ``members`` (per
member: its ``subnet``, ``key``, ``index``, parameters, FLOPs, metrics). Plain onnxruntime runs
only the chosen member's ``If`` branch (``sess.run(["logits"], {"input": x, "member":
np.array(index)})``); ``export.runtime.Predictor(path, member=...)`` starts onnxruntime on that
branch alone (:mod:`export.onnx_prune`), so the session holds only that member's weights.
Language models are refused: their key/value cache inputs differ per member.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxscript.rewriter

import zoo
from zoo import Member, WeightsSource
from zoo.fileio import atomic_path

from .family_graph import MEMBER_INPUT, MemberGraph, merge_members, selectable
from .onnx_export import QUANTIZE_CHOICES, _opset_of, _save, _without_unused_opsets, to_onnx, zoo_record
from .quantize import METHODS, evaluate, method_for, quantize_int8
from .verify import FP32_TOLERANCE, check_model, max_abs_difference, require_device, session


@contextlib.contextmanager
def _batch_norm_kept():
    """The exporter's optimizer without its batch-norm folding rules (onnxscript reads its rule
    list from ``onnxscript.rewriter._DEFAULT_REWRITE_RULES`` on every call)."""
    rules = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    folding = set(onnxscript.rewriter._fuse_batchnorm.rules)
    onnxscript.rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r not in folding)
    try:
        yield
    finally:
        onnxscript.rewriter._DEFAULT_REWRITE_RULES = rules


@dataclass
class FamilyExportResult:
    """What a family export wrote and measured."""

    path: Path
    members: list[dict]  # the record's entries, plus max_abs_diff per member
    size_bytes: int
    export_seconds: float
    metadata: dict = field(repr=False)

    def summary(self) -> str:
        record = self.metadata
        lines = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.2f} MB, opset {record['opset']}, "
            f"{len(self.members)} members of {record['arch']}, {self.export_seconds:.1f} s to export)"
        ]
        for entry in self.members:
            diff = entry.get("max_abs_diff")
            check = "not verified" if diff is None else f"max |onnxruntime - PyTorch| = {diff:.2e}"
            lines.append(
                f"  member {entry['index']} ({entry['key']}): {Member.from_dict(entry['subnet'])}, "
                f"{entry['num_params']:,} parameters, {entry['flops'] / 1e6:,.2f} MFLOPs, {check}"
            )
        if record.get("quantized"):
            lines.append(f"int8 ({record['quantization']['method']}), per member on the validation data:")
            for key, change in record["quantization"]["members"].items():
                lines.append(f"  {key}: " + ", ".join(f"{k} {v:+.4f}" for k, v in change["change"].items()))
        lines.append(
            f"verification tolerance {FP32_TOLERANCE:g} of the outputs' scale (fp32); "
            f"shared tensors: {record['family_sharing']}"
        )
        return "\n".join(lines)


def _member_entry(sliced, model, flops: int, index: int) -> dict:
    metrics = sliced.metadata.get("metrics") or []
    return {
        "subnet": sliced.member.to_dict(),
        "key": sliced.member.key,
        "index": index,
        "num_params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "metrics": {k: v for k, v in metrics[0].items() if k != "subnet"} if metrics else None,
    }


def _members_to_export(source: WeightsSource) -> list[Member]:
    model = source.model
    if model.input_kind == "tokens":
        raise ValueError(
            f"{model.arch} is a language model: its members' key/value cache inputs differ in shape, "
            "so they cannot share one file; export them one by one (zoo export --all)"
        )
    if model.largest not in model.members:
        raise ValueError(
            f"a family file shares the largest member's weights, and {model.largest} is not a trained member "
            f"of this file (members: {', '.join(map(str, model.members))})"
        )
    return list(model.members)


def _export_graphs(source: WeightsSource, opset: int | None, device: str):
    """Per member (largest last): its sliced model, record entry and exported graph."""
    exported = []
    for index, member in enumerate(sorted(_members_to_export(source), key=lambda m: m == source.model.largest)):
        sliced = source.member(member)
        model = sliced.model.eval()
        flops = zoo.count_flops(model, batch_size=1)
        with _batch_norm_kept():
            proto, _ = to_onnx(model.to(device), opset, device)
        exported.append((sliced, model, _member_entry(sliced, model, flops, index), proto))
    return exported


def _verify_members(path: Path, exported, device: str) -> dict[str, float]:
    """Every member's output against its sliced PyTorch model (the file is refused above tolerance);
    the largest difference per member key."""
    check_model(path)
    sess, diffs = session(path, device), {}
    for _, model, entry, _ in exported:
        gap = max_abs_difference(model, path, device, sess, _choosing(entry))
        if not gap.within():
            raise ValueError(gap.failure(f"member {entry['key']}"))
        diffs[entry["key"]] = gap.max_abs
    return diffs


def _choosing(entry: dict) -> dict:
    """The inputs beside ``input`` that run one member of a family file."""
    return {MEMBER_INPUT: np.array(entry["index"], dtype=np.int64)}


def _quantize(flat: onnx.ModelProto, work: Path, record: dict, method: str, calibration, validation) -> dict:
    """Quantize the family graph (as one output per member: the quantizer calibrates the main
    graph's tensors, not a branch's) into ``work/family.int8.onnx``; the record with every
    member's int8 metrics and their change."""
    fp32_path, flat_path, int8_path = work / "family.onnx", work / "flat.onnx", work / "family.int8.onnx"
    onnx.save_model(flat, str(flat_path))
    quantize_int8(flat_path, work / "flat.int8.onnx", method, calibration)
    int8 = selectable(onnx.load(str(work / "flat.int8.onnx")), len(record["members"]) - 1)
    onnx.save_model(_without_unused_opsets(int8), str(int8_path))
    fp32_sess, int8_sess = session(fp32_path), session(int8_path)
    per_member, members = {}, []
    for entry in record["members"]:
        kind = record["input"]["kind"]
        fp32 = evaluate(fp32_path, validation, kind, fp32_sess, _choosing(entry))
        int8 = evaluate(int8_path, validation, kind, int8_sess, _choosing(entry))
        per_member[entry["key"]] = {"fp32": fp32, "int8": int8, "change": {k: int8[k] - fp32[k] for k in fp32}}
        members.append({**entry, "metrics": dict(int8)})
    report = {
        "method": METHODS[method],
        "calibration_samples": sum(len(b) for b in calibration or []),
        "validation_samples": sum(t.size for _, t in validation),
        "validation_batches": len(validation),
        "fp32_bytes": fp32_path.stat().st_size,
        "members": per_member,
    }
    return {**record, "members": members, "quantized": "int8", "quantization": report, "metrics": None}


def _check_options(out, opset, quantize, device, validation) -> None:
    require_device(device)
    if Path(out).is_dir():
        raise ValueError(f"the output {out} is a folder; a family file is one .onnx file")
    if opset is not None and not 18 <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be between 18 and {onnx.defs.onnx_opset_version()}, got {opset}")
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize and (device != "cpu" or not validation):
        raise ValueError("--quantize int8 runs on --device cpu and measures its cost on data: give --calibrate DATA")


def export_family(
    source: WeightsSource,
    out: str | os.PathLike,
    *,
    opset: int | None = None,
    device: str = "cpu",
    verify_output: bool = True,
    quantize: str | None = None,
    calibration: list[np.ndarray] | None = None,
    validation: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> FamilyExportResult:
    """Write every trained member of ``source``'s family to one ONNX file at ``out``, verified
    member by member against PyTorch; optionally int8 (``calibration``, ``validation``: as
    :func:`export.onnx_export.export_member` takes them). ``out`` appears only on success."""
    _check_options(out, opset, quantize, device, validation)
    started = time.perf_counter()
    exported = _export_graphs(source, opset, device)
    largest_sliced, largest_model, _, largest_proto = exported[-1]
    chunks = tuple(sorted({getattr(m, "chunks", 1) for m in source.model.modules()}))
    graphs = [MemberGraph(entry["key"], proto) for _, _, entry, proto in exported]
    flat, sharing = merge_members(largest_proto, graphs, chunks)
    proto = selectable(flat, len(exported) - 1)
    export_seconds = time.perf_counter() - started
    opset_written = _opset_of(largest_proto)
    record = zoo_record(largest_sliced, largest_model, {}, opset_written, exported[-1][2]["flops"])
    record["members"] = [entry for _, _, entry, _ in exported]
    record["family_sharing"] = {k: f"{v['shared']} shared, {v['own']} own" for k, v in sharing.items()}
    with tempfile.TemporaryDirectory(prefix="zoo-family-") as work:
        final = Path(work) / "family.onnx"
        _save(proto, final, record, what=f"family of {len(exported)} members")
        diffs = _verify_members(final, exported, device) if verify_output else {}
        if quantize:
            method = method_for(source.model.uses_batchnorm)
            record = _quantize(flat, Path(work), record, method, calibration, validation)
            final = Path(work) / "family.int8.onnx"
            _save(onnx.load(str(final)), final, record, what="int8 family")
            check_model(final)
        with atomic_path(out) as tmp:
            shutil.copyfile(final, tmp)
    members = [{**entry, "max_abs_diff": diffs.get(entry["key"])} for entry in record["members"]]
    return FamilyExportResult(Path(out), members, Path(out).stat().st_size, export_seconds, record)
