"""`zoo profile` (a latency table per block and width) and `zoo search --profile` (latency
predicted from it, then the chosen member measured for real); "smaller is never slower"."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import zoo
from zoo import Member


class _Run:
    """A `zoo` command run in this process (CliRunner): exit code, stdout and stderr."""

    def __init__(self, args: tuple[str, ...]):
        from typer.testing import CliRunner

        from cli import commands  # noqa: F401  (registers the commands)
        from cli.app import app

        result = CliRunner().invoke(app, list(args))
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


def _zoo(*args: str) -> _Run:
    return _Run(args)


def _tiny_family(**kwargs) -> zoo.ElasticModel:
    """A digits-shaped ResNet-20 of two widths and one block per stage: a table of few entries."""
    torch.manual_seed(0)
    args = dict(num_classes=10, in_chans=1, img_size=8, widths=[0.5, 1.0], max_member={"depth": [1, 1, 1]})
    return zoo.create_model("slim_resnet20", **{**args, **kwargs})


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """The family's file and the table `zoo profile` wrote beside it."""
    path = zoo.save(
        _tiny_family(), tmp_path_factory.mktemp("family") / "model.safetensors", metadata={"data": "digits"}
    )
    done = _zoo("profile", str(path), "--repeats", "3")
    assert done.returncode == 0, done.stderr
    return path, path.parent / "latency_profile_t1_b1.json", done.stdout


def test_the_table_holds_every_block_at_every_width_and_how_it_was_measured(profiled):
    import onnxruntime

    from export.profile import device

    _, table_path, stdout = profiled
    assert f"wrote {table_path}: 3 blocks" in stdout
    table = json.loads(table_path.read_text())
    assert table["arch"] == "slim_resnet20" and table["input"] == [1, 1, 8, 8]
    assert (table["threads"], table["batch"], table["repeats"]) == (1, 1, 3)
    assert table["device"] == device() and table["runtime"]["onnxruntime"] == onnxruntime.__version__
    assert table["model_args"]["widths"] == [0.5, 1.0]
    units = table["units"]
    assert list(units) == ["stages.0.0", "stages.1.0", "stages.2.0"]
    assert units["stages.0.0"]["fields"] == [["width", 0]] and set(units["stages.0.0"]["ms"]) == {"0.5", "1"}
    assert units["stages.1.0"]["fields"] == [["width", 0], ["width", 1]]  # reads stage 0's width, writes its own
    assert set(units["stages.1.0"]["ms"]) == {"0.5|0.5", "0.5|1", "1|0.5", "1|1"}
    assert table["rest"]["fields"] == [["width", 0], ["width", 2]]  # the stem and the classifier
    assert len(table["rest"]["ms"]) == 4 and all(ms == ms for ms in table["rest"]["ms"].values())
    assert units["stages.2.0"]["kept"] == ["depth", 2, 0]
    assert not [p for p in table_path.parent.iterdir() if p.name not in ("model.safetensors", table_path.name)]


def test_a_failed_write_leaves_the_old_table_whole(profiled, tmp_path):
    from export.profile import write_profile

    _, table_path, _ = profiled
    target = tmp_path / "t.json"
    shutil.copy(table_path, target)
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_profile({"units": object()}, target)  # not JSON: fails while writing
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_prediction_is_the_tables_sum_and_deterministic(profiled):
    from export.profile import LatencyTable
    from zoo.search import Budget, Evolution

    path, table_path, _ = profiled
    model = zoo.load(path)
    table = LatencyTable.load(table_path.parent, model, threads=1)  # a folder finds its table
    document = json.loads(table_path.read_text())
    member = Member(width=[1.0, 0.5, 1.0])
    blocks = [document["units"]["stages.0.0"]["ms"]["1"], document["units"]["stages.1.0"]["ms"]["1|0.5"]]
    blocks.append(document["units"]["stages.2.0"]["ms"]["0.5|1"])
    fit = document["fit"]
    expected = document["rest"]["ms"]["1|1"] + fit["scale"] * sum(blocks) - 3 * fit["per_block_ms"]
    assert table(member) == pytest.approx(expected, rel=1e-12)
    limit = table(model.smallest_member()) * 1.01  # a tight budget: most members are over it

    def search():
        cost = lambda m: {"latency": table(m)}  # noqa: E731
        evolution = Evolution(model, lambda m: zoo.count_params(model, m), cost, Budget("latency", limit), seed=1)
        return [(c.member, c.costs["latency"]) for c in evolution.run(population=4, generations=2).candidates]

    first = search()
    assert first == search() and all(ms <= limit for _, ms in first)


def test_search_with_a_profile_prints_predicted_against_measured(profiled, tmp_path):
    from export.profile import LatencyTable

    path, table_path, _ = profiled
    model = zoo.load(path)
    budget = LatencyTable.load(table_path, model, 1)(Member(width=1.0)) * 2
    out = tmp_path / "search"
    args = ("--population", "2", "--generations", "1", "--limit", "16", "--no-verify", "--out", str(out))
    done = _zoo("search", str(path), "--budget", f"latency={budget}", "--profile", str(table_path), *args)
    assert done.returncode == 0, done.stderr
    line = next(t for t in done.stdout.splitlines() if "predicted" in t)
    assert "ms measured, predicted" in line and "%" in line
    report = json.loads((out / "pareto.json").read_text())
    assert report["latency_profile"] == str(table_path) and report["latency_check"]["predicted"] is True
    assert report["latency_check"]["search_ms"] == LatencyTable.load(table_path, model, 1)(
        Member.from_dict(report["best"]["member"])
    )


def test_bad_profiles_are_one_line_errors(profiled, tmp_path):
    path, table_path, _ = profiled
    good = json.loads(table_path.read_text())
    cases = {
        "missing.json": (None, "no latency profile at"),
        "corrupt.json": ("{not json", "is not a zoo latency profile (unreadable JSON"),
        "shape.json": (json.dumps({**good, "units": []}), "is not a zoo latency profile: units must be an object"),
        "other.json": (json.dumps({**good, "arch": "slim_resnet56"}), "was measured for slim_resnet56, not"),
        "size.json": (json.dumps({**good, "input": [1, 1, 16, 16]}), "was measured on input [1, 1, 16, 16]"),
        "threads.json": (json.dumps({**good, "threads": 2}), "was measured with 2 threads, not 1"),
        "rounded.json": (
            json.dumps({**good, "model_args": {**good["model_args"], "round_channels": 16}}),
            "was measured for another slim_resnet20 (round_channels: 16 there, None here)",
        ),
    }
    out = tmp_path / "out"
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        done = _zoo("search", str(path), "--budget", "latency=5", "--profile", str(tmp_path / name), "--out", str(out))
        assert done.returncode == 1 and message in done.stderr, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_member_slower_than_one_containing_it_is_flagged():
    from zoo.space import contains, slower_containers

    model = zoo.create_model("slim_resnet20")
    small, big = model.resolve_member(Member(width=[0.5, 1, 1], depth=[1, 3, 3])), model.resolve_member(1.0)
    other = model.resolve_member(Member(width=[1, 0.25, 1]))
    assert contains(model.expand(big), model.expand(small)) and not contains(model.expand(small), model.expand(big))
    assert not contains(model.expand(small), model.expand(other)) and not contains(
        model.expand(other), model.expand(small)
    )
    assert slower_containers(model, {small: 2.0, big: 1.0, other: 0.5}) == [(small, big, 2.0, 1.0)]
    assert slower_containers(model, {small: 1.04, big: 1.0}) == []  # within the timing noise
    vit = zoo.create_model("slim_vit_tiny")
    fewer, more = vit.resolve_member({"blocks": [0, 11]}), vit.resolve_member({"blocks": [0, 5, 11]})
    assert slower_containers(vit, {fewer: 3.0, more: 1.0}) == [(fewer, more, 3.0, 1.0)]


def test_zoo_bench_flags_a_member_measured_slower_than_its_container(capsys):
    from cli.deploy_commands import _print_slower
    from export.benchmark import MemberResult, slower_members

    model = zoo.create_model("slim_resnet20")
    small, big = model.resolve_member(0.5), model.resolve_member(1.0)
    results = [
        MemberResult(small, 1, 1, latency_ms={"pytorch": {1: 1.0, 8: 3.0}, "onnxruntime": {1: 2.0, 8: 3.0}}),
        MemberResult(big, 2, 2, latency_ms={"pytorch": {1: 1.5, 8: 6.0}, "onnxruntime": {1: 1.0, 8: 6.0}}),
    ]
    slower = slower_members(model, results)
    assert slower == [
        {"runtime": "onnxruntime", "batch": 1, "member": {"width": 0.5}, "member_ms": 2.0,
         "container": {"width": 1.0}, "container_ms": 1.0}
    ]  # fmt: skip
    _print_slower(slower)
    assert capsys.readouterr().out == (
        "smaller is slower (onnxruntime, batch 1): width=0.5 measured 2.000 ms, more than width=1 which contains it "
        "(1.000 ms)\n"
    )


def test_round_channels_is_a_family_argument_recorded_in_the_file(tmp_path):
    model = _tiny_family(round_channels=12, widths=[0.25, 1.0])
    assert model.model_args["round_channels"] == 12
    small = zoo.slice(model, 0.25)  # stage widths 16, 32, 64 at 0.25: 4, 8, 16 rounded to multiples of 12
    assert [s[0].conv1.out_channels for s in small.stages] == [12, 12, 12]
    path = zoo.save(model, tmp_path / "m.safetensors")
    assert zoo.read_header(path)["model_args"]["round_channels"] == 12
    assert zoo.load(path).model_args["round_channels"] == 12
    with pytest.raises(ValueError, match="round_channels must be a positive integer, got 0"):
        _tiny_family(round_channels=0)
