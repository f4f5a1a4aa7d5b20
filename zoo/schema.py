"""The declared shape of every JSON document zoo reads back, and the one check that enforces it.

A file's content is checked here where it enters (a weights file's zoo header, a family
folder's ``config.json``, an exported file's zoo record, ``--member`` JSON, a training
checkpoint's top level), so code further on may index it without guarding every access, and a
foreign or damaged file is one line naming the file, the field and what it should hold:

    check(header, ZOO_HEADER, f"{path} has a corrupt zoo header", WeightsFileError)
    # m.safetensors has a corrupt zoo header: metadata.metrics[0] must be an object, got 'bad'

Schemas are plain values built from a few node types (:class:`Object`, :class:`ListOf`,
:class:`Either`, ...). Unknown keys are accepted where a later version may add fields.
Standard library only: ``zoo info``, ``zoo run`` and ``zoo list`` load this module without
importing torch (see ``cli.app.zoo_module``).
"""

from __future__ import annotations

import reprlib
from typing import Any, Callable


class SchemaError(ValueError):
    """A document that does not have its declared shape (a one-line message)."""


class _Mismatch(Exception):
    def __init__(self, where: str, expected: str, got: Any):
        self.where, self.expected, self.got = where, expected, got


class Node:
    """A schema: ``check(value, where)`` raises :class:`_Mismatch`; ``name`` says what it accepts."""

    name = "anything"

    def check(self, value: Any, where: str) -> None:
        pass

    def __or__(self, other: "Node") -> "Either":
        return Either(self, other)


class Type(Node):
    """A JSON scalar of one of ``types`` (never a boolean: ``True`` is not a number here)."""

    def __init__(self, name: str, *types: type):
        self.name, self.types = name, types

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, self.types):
            raise _Mismatch(where, self.name, value)


class Where(Node):
    """``schema`` and a condition on the value (``name`` says both)."""

    def __init__(self, schema: Node, condition: Callable[[Any], bool], name: str):
        self.schema, self.condition, self.name = schema, condition, name

    def check(self, value: Any, where: str) -> None:
        self.schema.check(value, where)
        if not self.condition(value):
            raise _Mismatch(where, self.name, value)


class OneOf(Node):
    """One of a few literal values."""

    def __init__(self, *values: Any):
        self.values = values
        self.name = "one of " + ", ".join(map(repr, values))

    def check(self, value: Any, where: str) -> None:
        if type(value) not in {type(v) for v in self.values} or value not in self.values:
            raise _Mismatch(where, self.name, value)


class Either(Node):
    """The first of ``choices`` that accepts the value."""

    def __init__(self, *choices: Node, name: str | None = None):
        self.choices = choices
        self.name = name or " or ".join(c.name for c in choices)

    def check(self, value: Any, where: str) -> None:
        problems = []
        for choice in self.choices:
            try:
                return choice.check(value, where)
            except _Mismatch as mismatch:
                problems.append(mismatch)
        # A choice that failed inside the value (not on a missing key) is the one meant.
        inside = [m for m in problems if m.where != where and m.got is not _ABSENT]
        raise inside[0] if inside else _Mismatch(where, self.name, value)


class Tagged(Node):
    """An object whose ``tag`` field (one of ``choices``' keys) selects its schema."""

    def __init__(self, tag: str, choices: dict):
        self.tag, self.choices = tag, choices
        self.name = f"an object with {tag} " + " or ".join(map(repr, choices))

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Mismatch(where, self.name, value)
        if self.tag not in value:
            raise _Mismatch(_join(where, self.tag), "present", _ABSENT)
        kind = value[self.tag]
        if not isinstance(kind, str) or kind not in self.choices:
            raise _Mismatch(_join(where, self.tag), "one of " + ", ".join(map(repr, self.choices)), kind)
        self.choices[kind].check(value, where)


class ListOf(Node):
    """A JSON array whose items all match ``item`` (``length``: exactly that many)."""

    def __init__(self, item: Node, length: int | None = None, nonempty: bool = False):
        self.item, self.length, self.nonempty = item, length, nonempty
        count = f"{length} " if length is not None else ""
        self.name = f"a {'non-empty ' if nonempty else ''}list of {count}{_plural(item.name)}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or (self.length is not None and len(value) != self.length):
            raise _Mismatch(where, self.name, value)
        if self.nonempty and not value:
            raise _Mismatch(where, self.name, value)
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")


class Object(Node):
    """A JSON object: ``required`` and ``optional`` keys with their schemas; any other key must
    match ``rest`` (None: no other key is allowed)."""

    name = "an object"

    def __init__(self, required: dict | None = None, optional: dict | None = None, rest: Node | None = None):
        self.required, self.optional, self.rest = required or {}, optional or {}, rest

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Mismatch(where, self.name, value)
        for key in self.required:
            if key not in value:
                raise _Mismatch(_join(where, key), "present", _ABSENT)
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Mismatch(where, "an object with string keys", value)
            schema = self.required.get(key) or self.optional.get(key) or self.rest
            if schema is None:
                raise _Mismatch(_join(where, key), "absent (not a known field)", item)
            schema.check(item, _join(where, key))


class Instance(Node):
    """A Python object of a class named ``qualified`` (e.g. ``torch.Tensor``), checked by name so
    that this module imports no library."""

    def __init__(self, qualified: str, name: str):
        self.qualified, self.name = qualified, name

    def check(self, value: Any, where: str) -> None:
        if not any(f"{c.__module__}.{c.__qualname__}" == self.qualified for c in type(value).__mro__):
            raise _Mismatch(where, self.name, value)


_ABSENT = object()


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _plural(name: str) -> str:
    article, _, noun = name.partition(" ")
    if article in ("a", "an") and noun.isalpha():
        return noun + "s"
    return f"items, each {name}"


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "nothing"
    if isinstance(value, (list, dict)):  # reprlib: a checkpoint's state is never printed whole
        return f"{'a list' if isinstance(value, list) else 'an object'} {_clip(reprlib.repr(value))}"
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return _clip(text)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(value: Any, schema: Node, what: str, error: type[Exception] = SchemaError) -> Any:
    """``value`` if it matches ``schema``, else ``error`` (a :class:`SchemaError` unless the
    caller has its own one-line error type) naming ``what`` (the file and the part of it), the
    field, what it should hold and what it holds."""
    try:
        schema.check(value, "")
    except _Mismatch as mismatch:
        field = f"{mismatch.where} " if mismatch.where else ""
        verb = "is missing" if mismatch.got is _ABSENT else f"must be {mismatch.expected}, got {_shown(mismatch.got)}"
        raise error(f"{what}: {field}{verb}") from None
    return value


# ----- the building blocks --------------------------------------------------------------------
ANY = Node()
STRING = Type("a string", str)
INTEGER = Type("an integer", int)
NUMBER = Type("a number", int, float)
NULL = Type("null", type(None))
COUNT = Where(INTEGER, lambda v: v >= 0, "an integer >= 0")
POSITIVE = Where(INTEGER, lambda v: v > 0, "an integer > 0")
NUMBERS = ListOf(NUMBER)


def nullable(schema: Node) -> Either:
    return Either(NULL, schema)


# ----- members --------------------------------------------------------------------------------
# A member as data: each field (width, rank, depth, heads, ...) one number or one per group.
MEMBER = Object(rest=nullable(NUMBER | NUMBERS))
# `--member`: one member, a list of them, or objects holding one under "member" (pareto.json's
# entries).
MEMBER_ENTRY = Either(Object(required={"member": MEMBER}, rest=ANY), MEMBER, name="a member (a JSON object)")
MEMBER_ARGUMENT = Either(ListOf(MEMBER_ENTRY, nonempty=True), MEMBER_ENTRY, name="a member or a list of members")

# ----- weights files: the safetensors header and zoo's record in its metadata ------------------
TENSOR_ENTRY = Object(
    required={"dtype": STRING, "shape": ListOf(COUNT), "data_offsets": ListOf(COUNT, length=2)}, rest=ANY
)
SAFETENSORS_HEADER = Object(optional={"__metadata__": nullable(Object(rest=STRING))}, rest=TENSOR_ENTRY)

METRICS = Object(optional={"subnet": MEMBER}, rest=ANY)  # one member's metric values
# What the training run or a conversion recorded about the data (top level or under "train").
RECORDED = {
    "data": nullable(STRING),
    "labels": nullable(ListOf(STRING | NUMBER)),
    "mean": nullable(NUMBERS),
    "std": nullable(NUMBERS),
    "crop_pct": nullable(NUMBER),
}
WEIGHTS_METADATA = Object(
    optional={
        **RECORDED,
        "metrics": nullable(ListOf(METRICS)),
        "train": nullable(Object(optional={**RECORDED, "wall_time_s": NUMBER}, rest=ANY)),
        "sliced_from": nullable(
            Object(
                optional={
                    "arch": STRING,
                    "subnet": MEMBER,
                    "source_sha256": STRING,
                    "source_path": STRING,
                },
                rest=ANY,
            )
        ),
        "converted_from": nullable(
            Object(
                optional={
                    "timm": nullable(STRING),
                    "checkpoint": nullable(STRING),
                    "order": nullable(STRING),
                    "max_abs_diff": NUMBER,
                },
                rest=ANY,
            )
        ),
        "bn_recalibration": nullable(Object(optional={"batches": COUNT, "data": nullable(STRING)}, rest=ANY)),
    },
    rest=ANY,
)
ZOO_HEADER = Object(
    required={"arch": STRING, "model_args": Object(rest=ANY)},
    optional={
        "format_version": INTEGER,
        "axes": ListOf(STRING),
        "subnets": ListOf(MEMBER),
        "num_params": COUNT,
        "dtype": OneOf("float32", "float16", "bfloat16"),
        "metadata": WEIGHTS_METADATA,
    },
    rest=ANY,
)
# A family folder's config.json (timm's Hub layout): what zoo reads of it.
HUB_CONFIG = Object(required={"architecture": STRING}, optional={"model_args": Object(rest=ANY)}, rest=ANY)

# ----- exported files: the record under the ONNX metadata key "zoo" -----------------------------
SIDE = Where(INTEGER, lambda v: 0 < v <= 2**16, "an integer in 1..65536")
IMAGE_INPUT = Object(
    required={
        "kind": OneOf("image"),
        "shape": ListOf(SIDE, length=3),
        "mean": ListOf(NUMBER, nonempty=True),
        "std": ListOf(Where(NUMBER, lambda v: v != 0, "a non-zero number"), nonempty=True),
    },
    optional={"crop_pct": nullable(Where(NUMBER, lambda v: 0 < v <= 10, "a number in (0, 10]"))},
    rest=ANY,
)
IMAGE_INPUT = Where(
    IMAGE_INPUT,
    lambda v: len(v["mean"]) == len(v["std"]) == v["shape"][0],
    "an image input whose mean and std have one value per channel (shape[0])",
)
TOKENS_INPUT = Object(
    required={"kind": OneOf("tokens"), "context_length": POSITIVE}, optional={"vocab_size": POSITIVE}, rest=ANY
)
INPUT = Tagged("kind", {"image": IMAGE_INPUT, "tokens": TOKENS_INPUT})
# Fields an export always writes hold their type; those it may leave empty are nullable.
ONNX_RECORD_FIELDS = {
    "arch": STRING,
    "family": STRING,
    "subnet": MEMBER,
    "input": INPUT,
    "labels": nullable(ListOf(STRING | NUMBER)),
    "metrics": nullable(METRICS),
    "num_params": COUNT,
    "flops": NUMBER,
    "source_sha256": STRING,
    "opset": INTEGER,
    "quantized": nullable(STRING),
    "quantization": Object(
        optional={"method": STRING, "fp32": METRICS, "int8": METRICS, "validation_samples": COUNT}, rest=ANY
    ),
    "low_rank_layers": Object(optional={"merged": COUNT, "factorized": COUNT}, rest=ANY),
    "fusions": nullable(Object(rest=COUNT)),
    "kv_cache": nullable(COUNT),
    "zoo_version": STRING,
    # a family file (`zoo export --family`): every member, chosen by key or by the input `member` = index
    "members": ListOf(
        Object(
            required={"subnet": MEMBER, "key": STRING, "index": COUNT},
            optional={"num_params": COUNT, "flops": NUMBER, "metrics": nullable(METRICS)},
            rest=ANY,
        )
    ),
}
# `zoo info` describes any record with an architecture; running one needs its input spec too.
ONNX_RECORD = Object(
    required={"arch": STRING}, optional={k: v for k, v in ONNX_RECORD_FIELDS.items() if k != "arch"}, rest=ANY
)
RUNNABLE_RECORD = Object(
    required={"arch": STRING, "input": INPUT},
    optional={k: v for k, v in ONNX_RECORD_FIELDS.items() if k not in ("arch", "input")},
    rest=ANY,
)

# ----- training checkpoints (torch.load(weights_only=True): tensors and plain data) ---------------
TENSOR = Instance("torch.Tensor", "a tensor")
STATE = Object(rest=ANY)  # a module's, optimizer's or scheduler's state_dict: its owner loads it
CHECKPOINT = Object(
    required={
        "format_version": OneOf(1),
        "config": Object(rest=ANY),
        "step": COUNT,
        "model": Object(rest=TENSOR),
        "optimizer": STATE,
        "scheduler": STATE,
        "strategy": Object(required={"generator": TENSOR}, rest=ANY),
        "rng": Object(
            required={
                "torch": TENSOR,
                "cuda": ListOf(TENSOR),
                "python": Object(
                    required={"version": INTEGER, "internal": ListOf(INTEGER), "gauss_next": nullable(NUMBER)}
                ),
                "numpy": Object(
                    required={"kind": STRING, "keys": TENSOR, "pos": INTEGER, "has_gauss": INTEGER, "gauss": NUMBER}
                ),
            }
        ),
        "history": ListOf(ANY),
        "wall_time_s": NUMBER,
    },
    optional={"update": Object(required={"generator": TENSOR}, rest=ANY), "precision": STATE, "ema": STATE},
    rest=ANY,
)
CHECKPOINT = Where(
    CHECKPOINT, lambda state: "ema" in state or not state["config"].get("ema"), "a checkpoint with the EMA its run kept"
)

# ----- a latency profile (``zoo profile``'s table; export/profile.py reads it) ------------------
FIELD = ListOf(Either(STRING, INTEGER), length=2)  # (axis, group)
LATENCY_TABLE = Object(
    required={"fields": ListOf(FIELD), "ms": Object(rest=NUMBER)}, optional={"kept": ListOf(Either(STRING, INTEGER))}
)
LATENCY_PROFILE = Object(
    required={
        "format": OneOf("zoo latency profile"),
        "version": OneOf(1),
        "arch": STRING,
        "input": ListOf(POSITIVE, nonempty=True),
        "batch": POSITIVE,
        "threads": POSITIVE,
        "device": Object(required={"cpu": STRING}, rest=ANY),
        "units": Object(rest=LATENCY_TABLE),
        "rest": LATENCY_TABLE,
        "fit": Object(required={"scale": NUMBER, "per_block_ms": NUMBER}),
    },
    rest=ANY,
)
