"""Fuzzing every file zoo reads through the commands that read it (Hypothesis, CI-sized).

Random documents and mutations of real ones (a field deleted, replaced by another JSON value,
or added) go into real files in their real formats: weights files (the safetensors header and
zoo's header in its metadata), family folders' ``config.json``, exported ONNX files' zoo
records, ``--member`` JSON (inline, in files, as ``pareto.json`` entries) and training
checkpoints. Each command must answer with its output or with one ``error:`` line and exit
code 1: never a traceback, never the CLI's "internal error" line (which means a bug).
Examples are derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from training import text_cache
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from training.data import load_data
from zoo.header import safetensors_header


def fuzzed(examples: int):
    """CI-sized and reproducible: the same ``examples`` cases on every run."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Values of every JSON type, and the wrong-typed values that broke `zoo info` before (issue 22).
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from([[], {}, "bad", ["bad"], -1, 0, 0.0, 1e308, math.nan, math.inf])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Names a mutation may add: the fields zoo's documents use.
KEYS = st.sampled_from(
    ["arch", "model_args", "metadata", "metrics", "subnet", "subnets", "width", "rank", "depth", "input", "kind",
     "shape", "mean", "std", "labels", "quantization", "fp32", "member", "data", "train", "sliced_from",
     "converted_from", "crop_pct", "context_length", "num_params", "dtype", "architecture", "low_rank"]
)  # fmt: skip


def _field(draw, doc) -> tuple:
    """A field of ``doc``, every key of a level as likely as another (a nested document's many
    fields would otherwise crowd out the top level's); () for an empty document."""
    path, node = (), doc
    while isinstance(node, (dict, list)) and node:
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        path, node = (*path, key), node[key]
        if draw(st.booleans()):
            break
    return path


@st.composite
def mutations(draw, doc):
    """``doc`` with one to three fields deleted, made null, replaced by another JSON value, or added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = _field(draw, doc)
        if not path:
            return draw(JSON)
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        target = parent[path[-1]]
        action = draw(st.sampled_from(["replace", "null", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "null":
            parent[path[-1]] = None
        elif action == "add" and isinstance(target, dict):
            target[draw(KEYS | st.text(max_size=4))] = draw(JSON)
        elif action == "add" and isinstance(target, list):
            target.append(draw(JSON))
        else:
            parent[path[-1]] = draw(JSON)
    return doc


def assert_answered(result, allowed=(0, 1)):
    """Exit 0 with output, or exit 1 with one ``error:`` line on stderr; never a traceback."""
    shown = result.output
    assert "Traceback" not in shown and "internal error" not in shown, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in allowed, shown
    if result.exit_code == 1:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


# ----- weights files -------------------------------------------------------------------------
SHIPPED = zoo.weights.pretrained_path("slim_resnet20")


def _split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (its JSON header, its tensor bytes)."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _safetensors(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


SHIPPED_HEADER, SHIPPED_DATA = _split(SHIPPED)
ZOO_HEADER = json.loads(SHIPPED_HEADER["__metadata__"]["zoo"])


def _with_zoo_header(header) -> dict:
    return {**SHIPPED_HEADER, "__metadata__": {"zoo": json.dumps(header)}}


@fuzzed(80)
@given(header=mutations(ZOO_HEADER) | JSON)
def test_info_on_fuzzed_zoo_headers(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("info") / "fuzzed.safetensors"
    path.write_bytes(_safetensors(_with_zoo_header(header), SHIPPED_DATA))
    assert_answered(invoke("info", path))


@fuzzed(60)
@given(header=mutations(SHIPPED_HEADER) | JSON, cut=st.integers(0, 64))
def test_info_on_fuzzed_safetensors_headers(tmp_path_factory, header, cut):
    path = tmp_path_factory.mktemp("raw") / "fuzzed.safetensors"
    path.write_bytes(_safetensors(header, SHIPPED_DATA)[: None if cut == 0 else -cut])
    assert_answered(invoke("info", path))


@fuzzed(25)
@given(data=st.binary(max_size=64))
def test_info_on_random_bytes(tmp_path_factory, data):
    for suffix in (".safetensors", ".onnx"):
        path = tmp_path_factory.mktemp("bytes") / f"random{suffix}"
        path.write_bytes(data)
        result = invoke("info", path)
        assert_answered(result, allowed=(1,))


@fuzzed(40)
@given(header=mutations(ZOO_HEADER))
def test_loading_fuzzed_zoo_headers(tmp_path_factory, header):
    """Every command that loads a family (slice, export, eval, bench, search) goes through
    ``zoo.load``: the architecture is rebuilt from the header's arguments."""
    folder = tmp_path_factory.mktemp("load")
    path = folder / "fuzzed.safetensors"
    path.write_bytes(_safetensors(_with_zoo_header(header), SHIPPED_DATA))
    assert_answered(invoke("slice", path, "--width", "0.5", "--out", folder / "small.safetensors"))


@fuzzed(30)
@given(config=mutations({"architecture": "slim_resnet20", "model_args": {}, "num_classes": 10}) | JSON)
def test_folders_with_fuzzed_configs(tmp_path_factory, config):
    folder = tmp_path_factory.mktemp("hub")
    (folder / "model.safetensors").write_bytes(SHIPPED.read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    assert_answered(invoke("info", folder))


# ----- exported ONNX files -----------------------------------------------------------------------
def _onnx_model() -> onnx.ModelProto:
    """A real 3-class image classifier (global average pool of a 3 x 8 x 8 image)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="zoo")


RECORD = {
    "arch": "slim_resnet20",
    "family": "resnet",
    "subnet": {"width": 0.5},
    "input": {"kind": "image", "shape": [3, 8, 8], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 1.0},
    "labels": ["a", "b", "c"],
    "metrics": {"accuracy": 0.5, "loss": 1.0},
    "num_params": 5,
    "flops": 10,
    "source_sha256": "0" * 64,
    "opset": 18,
    "quantized": "int8",
    "quantization": {"method": "static", "fp32": {"accuracy": 0.5}, "int8": {"accuracy": 0.5}, "validation_samples": 4},
    "low_rank_layers": {"merged": 0, "factorized": 0},
    "fusions": None,
    "kv_cache": None,
    "zoo_version": "0.1.0",
}


def _onnx_file(folder: Path, record) -> Path:
    model = _onnx_model()
    helper.set_model_props(model, {"zoo": json.dumps(record)})
    path = folder / "member.onnx"
    onnx.save(model, str(path))
    return path


def test_the_unfuzzed_onnx_file_runs(tmp_path):
    """The base of the ONNX fuzzing is a working export: info and run answer with exit 0."""
    path = _onnx_file(tmp_path, RECORD)
    np.save(tmp_path / "image.npy", np.full((8, 8, 3), 0.5, np.float32))
    info = invoke("info", path)
    assert info.exit_code == 0 and "slim_resnet20 (family resnet)" in info.output, info.output
    run = invoke("run", path, tmp_path / "image.npy", "--top-k", "1")
    assert run.exit_code == 0 and run.output.startswith(f"{tmp_path / 'image.npy'}: a 0.3333"), run.output


# Valid input specs that may contradict the graph (3 x 8 x 8 floats).
INPUTS = st.fixed_dictionaries({"kind": st.just("tokens"), "context_length": st.integers(1, 64)}) | st.integers(
    1, 4
).flatmap(
    lambda channels: st.fixed_dictionaries(
        {
            "kind": st.just("image"),
            "shape": st.tuples(st.just(channels), st.integers(1, 16), st.integers(1, 16)).map(list),
            "mean": st.just([0.5] * channels),
            "std": st.just([0.25] * channels),
        }
    )
)


FUZZED_RECORDS = mutations(RECORD) | JSON | INPUTS.map(lambda spec: {**RECORD, "input": spec})


@fuzzed(100)
@given(record=FUZZED_RECORDS)
def test_info_on_fuzzed_onnx_records(tmp_path_factory, record):
    assert_answered(invoke("info", _onnx_file(tmp_path_factory.mktemp("onnx"), record)))


@fuzzed(30)
@given(record=FUZZED_RECORDS)
def test_run_on_fuzzed_onnx_records(tmp_path_factory, record):
    """`zoo run` starts an onnxruntime session per case: fewer cases."""
    folder = tmp_path_factory.mktemp("run")
    path = _onnx_file(folder, record)
    np.save(folder / "image.npy", np.full((8, 8, 3), 0.5, np.float32))
    assert_answered(invoke("run", path, folder / "image.npy", "--top-k", "2"))
    assert_answered(invoke("run", path, "a prompt"))


# ----- members as JSON ---------------------------------------------------------------------------
MEMBER = {"width": [0.5, 1.0, 1.0], "depth": [1, 3, 3]}
PARETO = {"best": {"member": MEMBER, "accuracy": 0.9}, "front": [{"member": {"width": 0.5}, "accuracy": 0.8}]}


@fuzzed(40)
@given(member=mutations(MEMBER) | mutations([PARETO["best"], *PARETO["front"]]) | JSON, as_file=st.booleans())
def test_fuzzed_members_through_slice(tmp_path_factory, member, as_file):
    folder = tmp_path_factory.mktemp("member")
    value = json.dumps(member)
    if as_file:
        (folder / "member.json").write_text(value)
        value = str(folder / "member.json")
    result = invoke("slice", "slim_resnet20", "--pretrained", "--member", value, "--out", folder / "m.safetensors")
    assert_answered(result)


# ----- text caches -------------------------------------------------------------------------------
@fuzzed(15)
@given(keep=st.integers(0, 1699) | st.none(), junk=st.binary(max_size=16))
def test_damaged_text_caches_are_rebuilt(tmp_path_factory, monkeypatch, keep, junk):
    """A text cache is raw bytes: its name records its size, and one cut short or grown is
    built again from the sources, never read as the corpus."""
    folder = tmp_path_factory.mktemp("text")
    monkeypatch.setenv("ZOO_CACHE_DIR", str(folder / "cache"))
    (folder / "corpus").mkdir()
    (folder / "corpus" / "a.txt").write_bytes(b"alpha beta\n" * 100)
    (folder / "corpus" / "b.txt").write_bytes(b"gamma delta\n" * 50)
    corpus = b"alpha beta\n" * 100 + b"gamma delta\n" * 50  # 1,700 bytes
    load_data(f"text:{folder / 'corpus' / 'a.txt'}", seq_len=16)  # another source's cache stays
    load_data(f"text:{folder / 'corpus'}", seq_len=16)
    [cache] = text_cache.cache_folder().glob("corpus-*.u8")
    assert cache.name.endswith("-1700.u8") and cache.read_bytes() == corpus
    damaged = corpus[:keep] + junk if keep is not None else corpus + junk
    assume(len(damaged) != len(corpus))  # a cache's size is all that raw bytes can be checked by
    cache.write_bytes(damaged)
    bundle = load_data(f"text:{folder / 'corpus'}", seq_len=16)
    [rebuilt] = text_cache.cache_folder().glob("corpus-*.u8")
    assert rebuilt.read_bytes() == corpus and bundle.train.size + bundle.val.size == len(corpus)
    assert len(list(text_cache.cache_folder().glob("*.u8"))) == 2


# ----- training checkpoints ------------------------------------------------------------------------
RUN = ["train", "slim_resnet20", "--steps", "2", "--batch-size", "16", "--eval-every", "2", "--width", "0.5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = invoke(*RUN, "--out", out)
    assert done.exit_code == 0, done.output
    (out / "model.safetensors").unlink()  # so that --resume restores the checkpoint
    return out, load_checkpoint(out / CHECKPOINT_NAME)


def _mutated_state(state: dict, draw) -> dict:
    """The checkpoint with a top-level or nested plain-data value changed (tensors kept)."""
    state = dict(state)
    key = draw(st.sampled_from(sorted(state)))
    action = draw(st.sampled_from(["delete", "replace", "tensor"]))
    if action == "delete":
        del state[key]
    elif action == "tensor" and isinstance(state[key], dict) and state[key]:
        inner = dict(state[key])
        name = draw(st.sampled_from(sorted(inner, key=str)))
        inner[name] = torch.zeros(draw(st.integers(0, 3)))
        state[key] = inner
    else:
        state[key] = draw(JSON)
    return state


@fuzzed(8)
@given(data=st.data())
def test_resuming_from_fuzzed_checkpoints(checkpoint, tmp_path_factory, data):
    """`zoo train --resume` on a damaged checkpoint (few cases: each builds a run)."""
    out, state = checkpoint
    folder = tmp_path_factory.mktemp("resume")
    for file in out.iterdir():  # the run as it was when its last checkpoint was written
        (folder / file.name).write_bytes(file.read_bytes())
    save_checkpoint(folder / CHECKPOINT_NAME, _mutated_state(state, data.draw))
    assert_answered(invoke(*RUN, "--out", folder, "--resume"))


def _first_tensor_reshaped(state: dict) -> dict:
    name = next(iter(state["model"]))
    return {**state, "model": {**state["model"], name: torch.zeros(3)}}


@pytest.mark.parametrize(
    "damage, message",
    [
        (_first_tensor_reshaped, "does not fit this run (Error(s) in loading state_dict for SlimResNet: size mismatch"),
        (lambda state: {**state, "strategy": {}}, "damaged zoo training checkpoint: strategy.generator is missing"),
        (lambda state: {**state, "rng": {**state["rng"], "torch": torch.zeros(3)}}, "does not fit this run (RNG state"),
        (lambda state: {**state, "step": -1}, "step must be an integer >= 0, got -1"),
    ],
    ids=["model-shape", "strategy", "rng", "step"],
)
def test_resuming_from_a_damaged_checkpoint_is_one_line(checkpoint, tmp_path, damage, message):
    out, state = checkpoint
    for file in out.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    save_checkpoint(tmp_path / CHECKPOINT_NAME, damage(state))
    result = invoke(*RUN, "--out", tmp_path, "--resume")
    assert_answered(result, allowed=(1,))
    assert message in result.stderr and str(tmp_path / CHECKPOINT_NAME) in result.stderr


def test_safetensors_header_reads_the_shipped_file():
    """The fuzzing's base documents are the shipped weights' own (so mutations start valid)."""
    assert safetensors_header(SHIPPED)["__metadata__"]["zoo"] == json.dumps(ZOO_HEADER)
    assert invoke("info", SHIPPED).exit_code == 0
