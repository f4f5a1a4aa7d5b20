"""Members of a family stored in a weights file: choose one, slice it out, say where it came from.

A batch-norm family has statistics only for the members it was trained for (its grid). Any
other member would run on another member's statistics, the silent failure Slimmable users
keep reporting, so it is refused unless calibration data is given to recalibrate it.
LayerNorm families (ViT, GPT) accept any valid member.

    source = WeightsSource.open("family.safetensors")
    member = source.member(width=0.5)
    zoo.save(member.model, "small.safetensors", metadata=member.metadata)

or in one call, ``slice_file("family.safetensors", "small.safetensors", width=0.5)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

import torch

from .base import ElasticModel
from .slicing import recalibrate_bn, slice_model
from .space import Member
from .weights import file_sha256, load, recorded, save  # noqa: F401  (recorded: imported from here by export and cli)

# Calibration batches, or a function of the loaded family that returns them (so that data is
# loaded only when a member needs it, and shaped for that model).
Calibration = Union[Iterable[torch.Tensor], Callable[[ElasticModel], Iterable[torch.Tensor]]]

# Metadata keys that describe one member, rewritten for every slice rather than inherited.
_MEMBER_KEYS = ("metrics", "sliced_from", "bn_recalibration")


def member_metrics(metadata: dict, member: Member) -> list[dict]:
    """The entries of ``metadata["metrics"]`` recorded for ``member`` (design-doc convention)."""
    entries = metadata.get("metrics") or []
    found = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            if Member.from_dict(entry["subnet"]) == member:
                found.append(entry)
        except (KeyError, TypeError, ValueError):
            continue
    return found


def recorded_members(model: ElasticModel) -> list[Member]:
    """The members a weights file was trained for: those with recorded metrics, else its grid."""
    recorded_metrics = getattr(model, "zoo_metadata", {}).get("metrics") or []
    members = [Member.from_dict(r["subnet"]) for r in recorded_metrics if isinstance(r, dict) and "subnet" in r]
    return members or list(model.members)


def select_members(
    model: ElasticModel,
    widths: Iterable[float] | None = None,
    ranks: Iterable[float] | None = None,
    members: Iterable = (),
) -> list[Member]:
    """The members a command works on, validated and sorted smallest first: the product of
    ``widths`` and ``ranks`` (each defaulting to the trained members' values) plus ``members``
    (any structure); nothing given, the trained members."""
    widths, ranks, members = list(widths or []), list(ranks or []), list(members)
    trained = recorded_members(model)
    if not widths and not ranks and not members:
        return trained
    chosen = [model.resolve_member(m) for m in members]
    if widths or ranks:
        widths = widths or sorted({s.width for s in trained if s.width is not None})
        rank_values = ranks or sorted({s.rank for s in trained if s.rank is not None}) or [None]
        chosen += [model.resolve_member(w, r) for w in widths for r in rank_values]
    return model.sort_members(set(chosen))


def untrained_error(model: ElasticModel, member: Member, where: str = "") -> ValueError:
    """A batch-norm member without statistics and no data to recalibrate it on."""
    return ValueError(
        f"{model.arch}{where} has batch-norm statistics only for its trained members "
        f"({model.describe_members()}); {member} is not one of them: pick one of those, "
        "or recalibrate it on data (--calibrate DATA)"
    )


def calibrate_members(model: ElasticModel, members: Iterable[Member], calibration: Calibration | None) -> list[Member]:
    """Recalibrate the batch-norm statistics of every member that has none (batches from
    ``calibration``, loaded only if some member needs them); returns those recalibrated."""
    missing = [s for s in members if model.needs_calibration(s)]
    if missing and calibration is None:
        raise untrained_error(model, missing[0])
    for member in missing:
        recalibrate_bn(model, calibration(model) if callable(calibration) else calibration, member)
    return missing


@dataclass
class SlicedMember:
    """A standalone member and the metadata to store with it."""

    model: ElasticModel
    member: Member
    metadata: dict
    source_sha256: str

    @property
    def recalibrated(self) -> bool:
        return "bn_recalibration" in self.metadata


@dataclass
class WeightsSource:
    """A loaded weights file, from which members are sliced."""

    path: Path
    model: ElasticModel
    sha256: str

    @classmethod
    def open(cls, path: str | os.PathLike) -> "WeightsSource":
        path = Path(path)
        model = load(path).eval()
        return cls(path, model, file_sha256(path))

    def resolve(self, member=None, rank: float | None = None) -> Member:
        """Validate a requested member (a Member, its dict, or a uniform width; None: the largest)."""
        return self.model.resolve_member(member, rank)

    def member(
        self,
        member=None,
        rank: float | None = None,
        calibration: Calibration | None = None,
        calibration_source: str | None = None,
    ) -> SlicedMember:
        """Slice one member out. An untrained member of a batch-norm family needs
        ``calibration`` batches (inputs only, no augmentation): its statistics are
        re-estimated on them and the metadata records it."""
        chosen = self.resolve(member, rank)
        recalibration = None
        if self.model.needs_calibration(chosen):
            if calibration is None:
                raise untrained_error(self.model, chosen, f" in {self.path}")
            counted = _Counted(calibration(self.model) if callable(calibration) else calibration)
            recalibrate_bn(self.model, counted, chosen)
            recalibration = {"batches": counted.seen, "data": calibration_source}
        small = slice_model(self.model, chosen).eval()
        inherited = {k: v for k, v in getattr(self.model, "zoo_metadata", {}).items() if k not in _MEMBER_KEYS}
        metadata = {
            **inherited,
            "sliced_from": {
                "arch": self.model.arch,
                "subnet": chosen.to_dict(),
                "source_sha256": self.sha256,
                "source_path": str(self.path.resolve()),
            },
            "metrics": member_metrics(getattr(self.model, "zoo_metadata", {}), chosen),
        }
        if recalibration is not None:
            metadata["bn_recalibration"] = recalibration
        small.zoo_metadata = metadata
        return SlicedMember(small, chosen, metadata, self.sha256)


class _Counted:
    """Counts the batches an iterable yields (recalibration reports how many it used)."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches, self.seen = batches, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            self.seen += 1
            yield batch


def slice_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    member=None,
    rank: float | None = None,
    calibration: Calibration | None = None,
    calibration_source: str | None = None,
) -> SlicedMember:
    """Write one member of the family in ``path`` to ``out`` as a standalone weights file."""
    if Path(out).resolve() == Path(path).resolve():
        raise ValueError(f"the output {out} is the source file itself; choose another path")
    if Path(out).is_dir():
        raise ValueError(f"the output {out} is a folder; give a file name")
    source = WeightsSource.open(path)
    sliced = source.member(member, rank, calibration, calibration_source)
    save(sliced.model, out, metadata=sliced.metadata)
    return sliced
