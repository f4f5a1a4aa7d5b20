"""Latency tables (Once-for-All's lookup tables): every block of a family timed in onnxruntime
on this device at every width it can run, and a member's latency predicted from them.

A *unit* is one block (a child of an ``ElasticBlocks``). Its shapes depend on a few member
values: the ``(axis, group)`` of every elastic ``Dim`` its layers read or write (a ResNet's
first block of a stage reads the previous stage's width and writes its own; a ViT block has
its own heads and MLP), and the rank of its group in a low-rank family. The table holds one
latency per unit and per combination of those values on the family's grid. Everything
outside the blocks (stem, pooling, classifier, the ops between blocks) is the *rest*, keyed
the same way by the dimensions outside the blocks, and measured as the whole member's latency
minus its blocks'. A member's prediction is its rest plus the blocks it keeps.

The members measured are chosen so that every unit meets every combination of its values
(a greedy covering: about the square of the number of widths for chains of stages). Each is
built at its own size (its weights do not matter to its latency), and its blocks and the whole
member are exported as ``zoo search`` measures members (:mod:`export.latency`) and timed in
one interleaved series, so that a slow spell of a shared machine hits all of them alike.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import torch

import zoo
from zoo import ElasticModel, Member
from zoo.fileio import atomic_path
from zoo.layers import ElasticBlocks, ElasticLayer

from .benchmark import onnx_session, time_interleaved
from .latency import export_fast, latency_clock
from .merge import merge_low_rank

FORMAT = "zoo latency profile"
VERSION = 1
Field = tuple[str, int]  # (axis, group) of a member value


def profile_name(threads: int, batch: int) -> str:
    """The file ``zoo profile`` writes and ``zoo search`` looks for beside a family."""
    return f"latency_profile_t{threads}_b{batch}.json"


def device() -> dict:
    """What the table was measured on: the processor's name, its architecture and core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "machine": platform.machine(), "cores": os.cpu_count()}


def _fields_of(module: torch.nn.Module) -> list[Field]:
    """The member values that size ``module``'s layers: their elastic dimensions, and their
    group's rank where a layer is factorized."""
    found: dict[Field, None] = {}
    for layer in module.modules():
        if not isinstance(layer, ElasticLayer):
            continue
        for dim in (getattr(layer, "in_dim", None), layer.out_dim):
            if dim is not None and dim.elastic:
                found[(dim.axis, dim.group)] = None
        if layer.low_rank:
            found[("rank", layer.group)] = None
    return sorted(found)


def units_of(model: ElasticModel) -> dict[str, dict]:
    """Every block of ``model`` by module name: the values that size it and when a member keeps
    it (``["depth", stage, position]``: the stage's first blocks; ``["blocks", index]``)."""
    units = {}
    for path, container in model.named_modules():
        if not isinstance(container, ElasticBlocks):
            continue
        for position, (key, block) in enumerate(container.items()):
            kept = ["depth", container.group, position] if container.axis == "depth" else ["blocks", int(key)]
            units[f"{path}.{key}"] = {"fields": _fields_of(block), "kept": kept}
    return units


def rest_fields(model: ElasticModel) -> list[Field]:
    """The member values that size everything outside the blocks."""
    inside = {id(m) for c in model.modules() if isinstance(c, ElasticBlocks) for m in c.modules()}
    found: set[Field] = set()
    for layer in model.modules():
        if isinstance(layer, ElasticLayer) and id(layer) not in inside:
            found.update(_fields_of(layer))
    return sorted(found)


def choices_of(model: ElasticModel, field: Field) -> list[float]:
    """The values one member field takes on the family's grid (capped by what the model holds)."""
    axis, group = field
    grid = model.rank_choices if axis == "rank" else model.width_choices
    return sorted({min(float(c), model.max_values[axis][group]) for c in grid})


def key_of(values: tuple) -> str:
    return "|".join(f"{v:g}" for v in values)


def design(model: ElasticModel, tables: dict[str, list[Field]]) -> list[dict[Field, float]]:
    """Members (as field assignments; fields left out stay at their largest) such that every
    table meets every combination of its fields' values: greedy, each member packing one
    missing combination per table where it agrees with those already packed."""
    wanted = {name: set(itertools.product(*(choices_of(model, f) for f in fields))) for name, fields in tables.items()}
    largest = {f: model.max_values[f[0]][f[1]] for fields in tables.values() for f in fields}
    members = []
    while any(wanted.values()):
        assigned: dict[Field, float] = {}
        for name, fields in tables.items():
            for combo in sorted(wanted[name]):
                if all(assigned.get(f, v) == v for f, v in zip(fields, combo)):
                    assigned.update(zip(fields, combo))
                    break
        full = {**largest, **assigned}
        for name, fields in tables.items():
            wanted[name].discard(tuple(full[f] for f in fields))
        members.append(assigned)
    return members


def member_with(model: ElasticModel, assigned: dict[Field, float]) -> Member:
    """The full-depth member with ``assigned`` values, the others at their largest."""
    values = {axis: list(v) for axis, v in model.max_values.items()}
    for (axis, group), value in assigned.items():
        values[axis][group] = value
    return model._space.compact({axis: tuple(v) for axis, v in values.items()})


def built_member(model: ElasticModel, member: Member) -> ElasticModel:
    """The family's architecture at ``member``'s size with fresh weights (latency does not
    depend on their values): what slicing builds, without needing batch-norm statistics."""
    chosen = member.to_dict()
    args = {**model.model_args, "max_member": chosen, "widths": [], "ranks": [], "extra_members": [chosen]}
    torch.manual_seed(0)
    return zoo.create_model(model.arch, **args).eval()


def kept(unit: dict, values) -> bool:
    """Whether a member (expanded ``values``) keeps the block ``unit`` describes."""
    how = unit["kept"]
    return how[2] < values["depth"][how[1]] if how[0] == "depth" else how[1] in values["blocks"]


def shallowest(model: ElasticModel, member: Member) -> Member:
    """``member`` with the fewest blocks a sampled member keeps (its widths unchanged)."""
    values = dict(model.expand(member))
    least = model._space.smallest(model.width_choices, model.rank_choices, model.max_values)
    values.update({axis: least[axis] for axis in ("depth", "blocks") if axis in values})
    return model._space.compact(values)


@torch.no_grad()
def block_inputs(small: ElasticModel, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each block of ``small`` receives inside it, by module name."""
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args, output) -> None:  # returns None: the block's output stays its own
            inputs[name] = args[0]

        return hook

    hooks = [
        block.register_forward_hook(keep_input(f"{path}.{key}"))
        for path, container in small.named_modules()
        if isinstance(container, ElasticBlocks)
        for key, block in container.items()
    ]
    try:
        small(example)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def time_member(wholes: dict[str, ElasticModel], batch: int, threads: int, repeats: int, work: Path) -> dict:
    """Median milliseconds of each block of ``wholes["full"]`` on its own (on the input it gets
    inside the member, less what a call that computes nothing costs) and of each whole model
    (keyed by its name in ``wholes``), timed in one interleaved series."""
    runs: dict = {}
    for name, whole in wholes.items():
        merge_low_rank(whole)  # as zoo search measures members
        example = whole.example_input(batch)
        runs[name] = _run(export_fast(whole, example, work / f"{name}.onnx"), example, threads)
    full, shapes = wholes["full"], {}
    for i, (name, x) in enumerate(block_inputs(full, full.example_input(batch)).items()):
        runs["block", name] = _run(export_fast(full.get_submodule(name), x, work / f"block{i}.onnx"), x, threads)
        shapes[name] = tuple(x.shape)
        if ("call", shapes[name]) not in runs:
            runs["call", shapes[name]] = _run(export_fast(_Copy(), x, work / f"call{i}.onnx"), x, threads)
    ms = time_interleaved(runs, repeats, warmup=3, clock=latency_clock(threads))
    blocks = {key[1]: value - ms["call", shapes[key[1]]] for key, value in ms.items() if key[0] == "block"}
    return {"blocks": blocks, **{name: ms[name] for name in wholes}}


class _Copy(torch.nn.Module):
    """A graph that computes nothing (one Identity): a session's cost per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _run(path: Path, x: torch.Tensor, threads: int) -> Callable[[], object]:
    session = onnx_session(path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def fit_rest(rows: list[tuple[str, float, int, float]]) -> tuple[dict[str, float], float, float]:
    """Whole members against their blocks: ``whole = rest[key] + scale * blocks - per_block * n``
    by least squares over ``rows`` of (rest key, summed block ms, blocks kept, whole ms). Blocks
    timed alone are a little slower than inside a graph (a call's setup; cache), and the rest
    (stem, head, glue) is never timed alone."""
    keys = sorted({row[0] for row in rows})
    matrix = np.zeros((len(rows), len(keys) + 2))
    for i, (key, blocks, count, _) in enumerate(rows):
        matrix[i, keys.index(key)], matrix[i, -2], matrix[i, -1] = 1.0, blocks, -count
    solution = np.linalg.lstsq(matrix, np.array([row[3] for row in rows]), rcond=None)[0]
    return dict(zip(keys, solution[:-2].tolist())), float(solution[-2]), float(solution[-1])


def _timed_members(model: ElasticModel, plan, units: dict, rest: list, options: dict, progress) -> tuple[dict, list]:
    """Every planned member timed: the blocks' samples by unit and key, and the fit's rows."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in units}
    rows = []
    for i, assigned in enumerate(plan):
        member = member_with(model, assigned)
        wholes = {"full": member, "shallow": shallowest(model, member)}
        if wholes["shallow"] == member:  # a family of one block per stage
            del wholes["shallow"]
        with tempfile.TemporaryDirectory(prefix="zoo-profile-") as work:
            built = {name: built_member(model, m) for name, m in wholes.items()}
            ms = time_member(built, **options, work=Path(work))
        for name, value in ms["blocks"].items():
            samples[name].setdefault(key_of(_values_at(units[name]["fields"], model.expand(member))), []).append(value)
        for name, whole in wholes.items():
            values = model.expand(whole)
            inside = [n for n, unit in units.items() if kept(unit, values)]
            rest_key = key_of(_values_at(rest, values))
            rows.append((rest_key, sum(ms["blocks"][n] for n in inside), len(inside), ms[name]))
        shallow = f", {ms['shallow']:.3f} ms shallowest" if "shallow" in ms else ""
        progress(f"member {i + 1}/{len(plan)}: {member} — {ms['full']:.3f} ms{shallow}")
    return samples, rows


def _values_at(fields, values) -> tuple:
    return tuple(values[axis][group] for axis, group in fields)


def measure(
    model: ElasticModel, *, threads: int = 1, batch: int = 1, repeats: int = 20, progress: Callable[[str], None] = print
) -> dict:
    """The latency table of ``model``'s family on this device (the JSON document ``zoo profile``
    saves)."""
    if model.input_kind != "image":
        raise ValueError(f"zoo profile measures image families; {model.arch} reads {model.input_kind}")
    units, rest = units_of(model), rest_fields(model)
    plan = design(model, {**{n: u["fields"] for n, u in units.items()}, "": rest})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        options = dict(batch=batch, threads=threads, repeats=repeats)
        samples, rows = _timed_members(model, plan, units, rest, options, progress)
    finally:
        torch.set_num_threads(previous)
    rest_ms, scale, per_block = fit_rest(rows)

    def table(fields, by_key):
        return {"fields": [list(f) for f in fields], "ms": {k: statistics.median(v) for k, v in sorted(by_key.items())}}

    return {
        "format": FORMAT,
        "version": VERSION,
        "arch": model.arch,
        "model_args": model.model_args,
        "input": list(model.example_input(batch).shape),
        "batch": batch,
        "threads": threads,
        "repeats": repeats,
        "device": device(),
        "runtime": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__.split("+")[0]},
        "exporter": "torch.onnx TorchScript, opset 17 (as zoo search measures members)",
        "clock": "thread CPU time" if threads == 1 else "wall time",
        "members_measured": len(rows),
        "units": {name: {**table(units[name]["fields"], samples[name]), "kept": units[name]["kept"]} for name in units},
        "rest": {"fields": [list(f) for f in rest], "ms": rest_ms},
        "fit": {"scale": scale, "per_block_ms": per_block},
    }


def write_profile(document: dict, path: str | os.PathLike) -> Path:
    """Save a table atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    return Path(path)


def _architecture(model_args: dict) -> dict:
    """The arguments that decide a family's shapes (its trained members aside)."""
    return json.loads(json.dumps({k: v for k, v in model_args.items() if k != "extra_members"}))


class LatencyTable:
    """A saved table, checked against the family it predicts for: ``table(member)`` is the
    member's predicted milliseconds (deterministic: a sum of looked-up numbers)."""

    def __init__(self, path: Path, document: dict, model: ElasticModel):
        self.path, self.document, self.model = path, document, model
        self.units = document["units"]
        self.rest = document["rest"]

    @classmethod
    def load(cls, path: str | os.PathLike, model: ElasticModel, threads: int | None = None) -> "LatencyTable":
        """Read and check a profile: one-line ``ValueError`` (``FileNotFoundError``) when it is
        missing, not a profile, or measured for another family, input size or thread count."""
        from zoo.schema import LATENCY_PROFILE, check

        path = Path(path)
        if path.is_dir():
            path = path / profile_name(threads or 1, 1)
        if not path.is_file():
            raise FileNotFoundError(f"no latency profile at {path} (write one with `zoo profile`)")
        try:
            document = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a zoo latency profile (unreadable JSON: {error})") from None
        check(document, LATENCY_PROFILE, f"{path} is not a zoo latency profile")
        table = cls(path, document, model)
        table.check(threads)
        return table

    def check(self, threads: int | None) -> None:
        """Refuse a table measured for another family, input, batch or thread count."""
        document, model = self.document, self.model
        where = f"latency profile {self.path}"
        if document["arch"] != model.arch:
            raise ValueError(f"{where} was measured for {document['arch']}, not {model.arch}")
        shape = list(model.example_input(document["batch"]).shape)
        if document["input"] != shape:
            raise ValueError(f"{where} was measured on input {document['input']}; {model.arch} here takes {shape}")
        mine, theirs = _architecture(model.model_args), _architecture(document.get("model_args") or {})
        if mine != theirs:
            differ = ", ".join(
                f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k)
            )  # fmt: skip
            raise ValueError(f"{where} was measured for another {model.arch} ({differ})")
        if threads is not None and document["threads"] != threads:
            raise ValueError(f"{where} was measured with {document['threads']} threads, not {threads}")
        expected = {n: [list(f) for f in u["fields"]] for n, u in units_of(model).items()}
        if {n: u["fields"] for n, u in self.units.items()} != expected or self.rest["fields"] != [
            list(f) for f in rest_fields(model)
        ]:
            raise ValueError(f"{where} describes other blocks than this {model.arch} (its model arguments differ)")

    def __call__(self, member) -> float:
        values = self.model.expand(self.model.resolve_member(member))
        inside = [self._look_up(name, unit, values) for name, unit in self.units.items() if kept(unit, values)]
        fit = self.document["fit"]
        return (
            self._look_up("the rest", self.rest, values)
            + fit["scale"] * sum(inside)
            - fit["per_block_ms"] * len(inside)
        )

    def _look_up(self, name: str, table: dict, values) -> float:
        key = key_of(_values_at(table["fields"], values))
        if key not in table["ms"]:
            raise ValueError(
                f"latency profile {self.path} has no latency for {name} at {key} (a value off the family's grid)"
            )
        return table["ms"][key]

    @property
    def same_device(self) -> bool:
        return self.document["device"].get("cpu") == device()["cpu"]
