"""One training run's configuration: the run itself (model, folder, seed, start) and its parts,
each owned by the module that uses it and validated there once.

- ``members``: :class:`training.strategies.MemberConfig` (which members, which strategy)
- ``updates``: :class:`training.updates.UpdateConfig` (the update policy)
- ``inputs``: :class:`training.data.DataConfig` (the data and how it is read)
- ``optim``: :class:`training.loop.OptimConfig` (optimizer, schedule, loss)
- ``loop``: :class:`training.loop.LoopConfig` (length, intervals, precision, EMA, compilation)
- ``dist``: :class:`training.distributed.DistConfig` (device, batch norm across processes)

A run is written down flat, one key per ``zoo train`` flag (:meth:`TrainConfig.flags`): that is
what checkpoints and weights files record, and what :meth:`TrainConfig.from_flags` reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

import zoo
from zoo.catalogue import unknown_model
from zoo.tokenizer import recorded_tokenizer_files

from .data import DataConfig
from .distributed import DistConfig, resolve_device
from .loop import LoopConfig, OptimConfig
from .precision import resolve_amp
from .strategies import MemberConfig
from .updates import UpdateConfig

PARTS = {"members": MemberConfig, "updates": UpdateConfig, "inputs": DataConfig, "optim": OptimConfig,
         "loop": LoopConfig, "dist": DistConfig}  # fmt: skip
# Flags that do not decide a run's trajectory: a resumed run may change them.
NOT_TRAJECTORY = {"out", "resume", "stop_after", "device", "workers", "ckpt_every", "eval_every", "eval_limit",
                  "compile", "compile_backend", "channels_last", "dist_timeout"}  # fmt: skip


@dataclass
class TrainConfig:
    """One training run. ``None`` in a part means "the default for the model's input kind"."""

    model: str
    out: str
    seed: int = 0  # seeds the model, the data order and split, the member choice, the policy
    init: str | None = None  # start from this zoo weights file
    resume: bool = False
    overwrite: bool = False  # start over in a folder that holds a run (not recorded: an action, not a setting)
    members: MemberConfig = field(default_factory=MemberConfig)
    updates: UpdateConfig = field(default_factory=UpdateConfig)
    inputs: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @classmethod
    def from_flags(cls, model: str, out: str, **flags) -> TrainConfig:
        """A config from one keyword per flag (``steps=``, ``widths=``, ``update=`` ...), each
        handed to the part that owns it."""
        run = {k: flags.pop(k) for k in ("seed", "init", "resume", "overwrite") if k in flags}
        parts = {}
        for name, part in PARTS.items():
            names = {f.name for f in dataclasses.fields(part)}
            parts[name] = part(**{k: flags.pop(k) for k in list(flags) if k in names})
        if flags:
            raise TypeError(f"unknown training flag(s): {', '.join(sorted(flags))}")
        return cls(model, out, **run, **parts)

    def flags(self) -> dict:
        """The run as one flat dict, one key per flag: what checkpoints and weights files record."""
        run = {"model": self.model, "out": self.out, "seed": self.seed, "init": self.init, "resume": self.resume}
        for name in PARTS:
            run.update(dataclasses.asdict(getattr(self, name)))
        return run

    def check(self) -> zoo.ElasticModel:
        """Validate every part, each once, without data (bad flags fail in a second); returns the
        family's structure (a meta model: no memory, no initialisation)."""
        if self.model not in zoo.list_models():
            raise ValueError(unknown_model(self.model, zoo.list_models()))
        self.members.check_flags()
        self.loop.check_flags()
        self.optim.check()
        self.inputs.check_flags()
        resolve_amp(self.loop.amp, resolve_device(self.dist.device))
        model = self.meta_model()
        kind = model.input_kind
        self.loop.check(self.model, kind, self.members.space)
        self.dist.check(model)
        self.inputs.check(self.model, kind)
        self.members.create(model, self.members.members(model), self.seed)
        self.updates.create(model, self.seed, self.members.strategy)
        return model

    def meta_model(self) -> zoo.ElasticModel:
        """The family's structure only (no memory, no initialisation): validates members."""
        with torch.device("meta"):
            model = zoo.create_model(self.model, **self.init_architecture(), low_rank=self.members.low_rank)
        model.zoo_metadata = self.init_carried()
        return model

    def _init_header(self) -> dict:
        header = zoo.read_header(self.init) if self.init else {}
        return header if header.get("arch") == self.model else {}  # another one: refused when loaded

    def init_architecture(self) -> dict:
        """The architecture arguments of the ``--init`` file (a converted ViT's patch size, a
        MobileNetV2's channel settings), without its members: the run chooses those."""
        members = {"low_rank", "widths", "ranks", "extra_members", "max_member"}
        return {k: v for k, v in self._init_header().get("model_args", {}).items() if k not in members}

    def init_carried(self) -> dict:
        """What the ``--init`` file records that the trained family carries on: its tokenizer
        (the text it reads, and what its outputs decode with)."""
        files = recorded_tokenizer_files(self._init_header().get("metadata") or {})
        return {"tokenizer": files} if files else {}

    def resolved(self, model: zoo.ElasticModel) -> TrainConfig:
        """A copy with every default for ``model``'s input kind filled in (what the run records)."""
        kind = model.input_kind
        return dataclasses.replace(
            self,
            inputs=self.inputs.resolved(kind, model.pretrained_cfg["input_size"][-1] if kind == "image" else None),
            optim=self.optim.resolved(kind),
            loop=self.loop.resolved(kind),
        )

    def check_same_run(self, saved: dict) -> None:
        """A resumed run must agree with its checkpoint on everything that shapes the trajectory."""
        defaults = TrainConfig.from_flags(self.model, self.out).flags()  # flags newer than the checkpoint
        saved = {**defaults, **saved}
        diffs = [
            f"{k}={saved.get(k)!r} (now {v!r})"
            for k, v in self.flags().items()
            if k not in NOT_TRAJECTORY and saved.get(k) != v
        ]
        if diffs:
            raise ValueError(
                f"--resume: the checkpoint in {self.out} was written with other settings: {', '.join(diffs)}; "
                "resume with the original flags"
            )
