"""Bring your own language model: a transformers causal LM becomes a zoo family.

    family = zoo.from_transformers("path/to/folder", order="activation", calibration=texts)
    family = zoo.from_transformers(hf_model)          # a transformers PreTrainedModel in memory

Steps, as :func:`zoo.from_timm` takes them: read the folder (``config.json`` and its weights, through
transformers, in float32) or take the model; let the family that registered the model's class
(``@converts_transformers``, beside the family as timm keeps ``checkpoint_filter_fn``) check its
configuration and modules and say which tensor fills which zoo tensor, refusing the first
unsupported part by name; fill the dense full family (every transformers tensor must be used);
permute every elastic dimension by importance (:mod:`zoo.importance`: key/value groups and MLP
units, whole heads only); build the requested family (factorized layers: the SVD of each
matrix); verify that the full member's logits equal transformers' own forward on random tokens.

transformers is an optional extra (``pip install -e ".[lm]"``): nothing here imports it until a
conversion runs, so ``import zoo`` never does.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .base import ElasticModel
from .convert import TOLERANCE, UnsupportedModel, _factorize_from, _members, compare_largest
from .importance import ORDERS, reorder
from .registry import create_uninitialized
from .space import DEFAULT_GRID
from .tokenizer import read_tokenizer_files

INSTALL = "converting a transformers model needs the lm extra: pip install 'zoo[lm]' (transformers, tokenizers)"


def require_transformers():
    """The transformers module, or a one-line ``ValueError`` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ValueError(INSTALL) from None
    return transformers


class Source:
    """The transformers model being converted: its configuration, and its tensors by name, each
    recorded as used when a planner takes it (the conversion refuses a model with tensors left)."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.name, self.config = model, name, model.config
        self.state = model.state_dict()
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise refuse(self.name, f"a model without {key}")
        self.used.add(key)
        return self.state[key].detach().to("cpu", torch.float32)

    def unused(self) -> list[str]:
        """Tensors no planner took (a tied lm_head shares the embedding's storage: it is used)."""
        taken = {self.state[k].data_ptr() for k in self.used}
        return [k for k, t in self.state.items() if k not in self.used and t.data_ptr() not in taken]


@dataclass
class LMPlan:
    """How one transformers model becomes a zoo family: the catalogue variant, its architecture
    arguments and every zoo tensor's value."""

    arch: str
    args: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


Planner = Callable[[Source], LMPlan]
_PLANNERS: dict[str, tuple[Planner, str]] = {}  # transformers class name -> (planner, what converts)


def converts_transformers(architecture: str, supports: str) -> Callable[[Planner], Planner]:
    """Register a family's planner for transformers models of class ``architecture`` (by name, so
    that registering imports no transformers); ``supports`` says what converts, in words."""

    def decorator(planner: Planner) -> Planner:
        _PLANNERS[architecture] = (planner, supports)
        return planner

    return decorator


def supported() -> str:
    return ", ".join(dict.fromkeys(supports for _, supports in _PLANNERS.values()))


def refuse(name: str, part: str) -> UnsupportedModel:
    return UnsupportedModel(f"cannot convert {name}: {part} is not supported (zoo converts {supported()})")


def require(ok: bool, source: Source, part: str) -> None:
    """Refuse ``part`` of the model unless ``ok``."""
    if not ok:
        raise refuse(source.name, part)


def require_class(module: nn.Module, expected: str, source: Source, where: str) -> None:
    """Exactly the transformers class ``expected`` (by name): a subclass may compute something else."""
    found = type(module).__name__
    require(found == expected, source, f"the module {where} of class {found} (expected {expected})")


def _planner(architecture: str, name: str) -> Planner:
    if architecture not in _PLANNERS:
        raise refuse(name, f"the {architecture} architecture")
    return _PLANNERS[architecture][0]


# ----- reading a folder ----------------------------------------------------------------------
def _read_folder(folder: Path) -> tuple[nn.Module, dict]:
    """The folder's model in float32 (transformers reads its config and safetensors), checked
    to hold every tensor the config asks for and no other."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: not a transformers model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not readable JSON ({err})") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or len(architectures) != 1 or not isinstance(architectures[0], str):
        raise ValueError(f'{config_path} names no single architecture ("architectures": {architectures!r})')
    _planner(architectures[0], str(folder))  # refuse before reading any weights
    transformers = require_transformers()
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # its load report and progress bars: the problems are reported below
    logging.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=torch.float32,
            output_loading_info=True,
            local_files_only=True,
            ignore_mismatched_sizes=True,  # listed in info, refused below by name
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"transformers cannot load {folder}: {first}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    problems = [f"missing {k}" for k in sorted(info.get("missing_keys", []))]
    problems += [f"unexpected {k}" for k in sorted(info.get("unexpected_keys", []))]
    problems += [_mismatch(k) for k in sorted(info.get("mismatched_keys", []), key=str)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"the weights in {folder} do not match its config.json: {'; '.join(problems[:3])}{more}")
    return model, {"transformers": architectures[0], "folder": str(folder)}


def _mismatch(entry) -> str:
    if isinstance(entry, (tuple, list)) and len(entry) == 3:  # (name, checkpoint shape, model shape)
        return f"{entry[0]} has shape {tuple(entry[1])}, the config asks for {tuple(entry[2])}"
    return f"{entry} has another shape than the config asks for"


# ----- calibration -----------------------------------------------------------------------------
def _token_batches(calibration, family: ElasticModel, folder: Path | None) -> list[torch.Tensor] | None:
    """Calibration as token batches: integer tensors ``(B, T)`` (or ``(T,)``) as given, or texts
    tokenized with the folder's ``tokenizer.json`` (one batch per text, cut to the context)."""
    if calibration is None:
        return None
    items = list(calibration)
    tokenizer = _tokenizer(folder) if any(isinstance(item, str) for item in items) else None
    batches = []
    for item in items:
        if isinstance(item, str):
            item = torch.tensor(tokenizer.encode(item).ids[: family.context_length], dtype=torch.long)
        if not isinstance(item, torch.Tensor) or item.is_floating_point() or item.dim() not in (1, 2):
            raise ValueError("calibration takes texts or integer token batches of shape (batch, seq_len)")
        item = item[None] if item.dim() == 1 else item
        if item.numel() == 0:
            continue
        if item.min() < 0 or item.max() >= family.vocab_size or item.shape[1] > family.context_length:
            raise ValueError(
                f"calibration tokens must lie in [0, {family.vocab_size}) with at most "
                f"{family.context_length} per sequence, got shape {tuple(item.shape)}"
            )
        batches.append(item.long())
    return batches


def _tokenizer(folder: Path | None):
    """The folder's ``tokenizer.json`` (the tokenizers library)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise ValueError("calibration texts need the model folder's tokenizer.json; give token batches instead")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(INSTALL) from None
    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as err:  # the Rust library raises its own Exception type for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{folder / 'tokenizer.json'} is not a readable tokenizer ({first})") from None


def _config_record(model: nn.Module) -> dict:
    """The model's config as JSON data, naming its architecture (a model built in memory names none)."""
    config = json.loads(json.dumps(model.config.to_dict(), default=str))
    config["architectures"] = [type(model).__name__]
    return config


# ----- the conversion --------------------------------------------------------------------------
@torch.no_grad()
def _fill(plan: LMPlan, source: Source, family: ElasticModel) -> None:
    """Fill the dense full family from the plan; every transformers tensor must be used."""
    state = family.state_dict()
    for key, tensor in plan.tensors.items():
        target = state[key]
        require(
            tuple(tensor.shape) == tuple(target.shape),
            source,
            f"a tensor of shape {tuple(tensor.shape)} for {key} (zoo's is {tuple(target.shape)})",
        )
        target.copy_(tensor)
    left = source.unused()
    require(not left, source, f"the part {left[0] if left else ''} (no zoo layer computes it)")
    unfilled = [k for k in state if k not in plan.tensors]
    if unfilled:
        raise ValueError(f"converting {source.name}: zoo's {unfilled[0]} was not filled (a bug in zoo.convert_lm)")


@torch.no_grad()
def max_difference(model: nn.Module, family: ElasticModel, seed: int = 0) -> tuple[float, float]:
    """Max abs difference between transformers' logits and the family's full member's (eval mode,
    random tokens at two batch sizes and lengths), and the largest logit magnitude."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    tokens = [
        torch.randint(0, family.vocab_size, (batch, min(length, family.context_length)), generator=generator)
        for batch, length in ((1, 7), (3, 24))
    ]

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()

    return compare_largest(model, family, tokens, logits)


def from_transformers(
    source: str | os.PathLike | nn.Module,
    *,
    order: str = "weight",
    calibration: Iterable[str | torch.Tensor] | None = None,
    low_rank: bool = False,
    widths: Iterable[float] | None = None,
    ranks: Iterable[float] | None = None,
) -> ElasticModel:
    """A zoo family made from a transformers causal LM: a local folder (``config.json`` and its
    safetensors) or a ``PreTrainedModel``. ``order``: ``weight``, ``activation`` (needs
    ``calibration``: token batches, or texts tokenized with the folder's ``tokenizer.json``) or
    ``none``. A folder's tokenizer files are recorded in ``zoo_metadata["tokenizer"]``
    (:mod:`zoo.tokenizer`), the model's config in ``zoo_metadata["transformers_config"]``
    (:mod:`zoo.transformers_out` writes members back with it). ``widths`` (and ``ranks`` with
    ``low_rank=True``) are the members (default as ``zoo train``'s; the full one is always kept).
    The full member's logits equal the model's: checked here, the difference recorded in
    ``model.zoo_metadata["converted_from"]``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if ranks is not None and not low_rank:
        raise ValueError("ranks were given, but the family is built dense; convert with low_rank=True")
    folder = None
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        model, origin = _read_folder(folder)
        name = str(folder)
    else:
        model, name = source, type(source).__name__
        if not hasattr(model, "config") or not isinstance(model, nn.Module):
            raise ValueError(f"from_transformers takes a model folder or a transformers model, got {name}")
        origin = {"transformers": name}
    reader = Source(model, name)
    plan = _planner(type(model).__name__, name)(reader)

    dense = create_uninitialized(plan.arch, **plan.args, widths=[1.0])
    _fill(plan, reader, dense)
    batches = _token_batches(calibration, dense, folder)
    if order == "activation" and not batches:
        raise ValueError("order 'activation' needs calibration texts or token batches (--calibrate)")
    reorder(dense, order, batches)

    family_widths = _members(widths, [1.0] if low_rank else DEFAULT_GRID, "width")
    family_ranks = _members(ranks, DEFAULT_GRID, "rank") if low_rank else None
    family = create_uninitialized(plan.arch, **plan.args, low_rank=low_rank, widths=family_widths, ranks=family_ranks)
    _factorize_from(dense, family)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()  # compared in float32; the caller's model is left as it is
    difference, scale = max_difference(model, family)
    if not difference <= TOLERANCE * max(1.0, scale):
        raise ValueError(
            f"converting {name} is not exact: max abs difference {difference:.3g} at full width "
            f"(logits up to {scale:.3g}); please report this"
        )
    family.zoo_metadata = {
        "converted_from": {
            **origin,
            "order": order,
            "calibration_batches": len(batches) if batches else 0,
            "max_abs_diff": difference,
        }
    }
    family.zoo_metadata["transformers_config"] = _config_record(model)  # what zoo slice --out DIR writes back
    tokenizer = read_tokenizer_files(folder) if folder is not None else {}
    if tokenizer:
        family.zoo_metadata["tokenizer"] = tokenizer
    return family.train()
