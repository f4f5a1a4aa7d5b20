"""Members as data: random per-stage/per-block members of every family slice exactly, cost what
their slices cost, skip real blocks, export, and are refused with clear errors when invalid."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo import Member

NAMES = zoo.list_models()
SMALL = {"slim_resnet20", "slim_mobilenetv2", "slim_vit_tiny", "slim_gpt_nano"}  # one per family
SIZED = [n if n in SMALL else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


def _tiny(name: str, **kwargs) -> zoo.ElasticModel:
    """A small-input model with every parameter off its initialisation (so all of them matter)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        kind = zoo.create_model(name).input_kind
    size = {"img_size": 32} if kind == "image" else {"context_length": 16}
    model = zoo.create_model(name, **size, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _blocks(model: torch.nn.Module) -> int:
    from zoo.layers import ElasticBlocks

    return sum(len(m) for m in model.modules() if isinstance(m, ElasticBlocks))


def _ready(model: zoo.ElasticModel, member: Member, x: torch.Tensor) -> None:
    """Batch-norm members get statistics from data first (slicing needs them)."""
    if model.needs_calibration(member):
        zoo.recalibrate_bn(model, [x, x + 0.1], member)


@pytest.mark.parametrize("name", SIZED)
@pytest.mark.parametrize("low_rank", [False, True], ids=["dense", "low-rank"])
@torch.no_grad()
def test_random_members_slice_exactly_and_cost_what_their_slice_costs(name, low_rank):
    model = _tiny(name, low_rank=low_rank)
    generator = torch.Generator().manual_seed(1)
    x = model.example_input(2, 16)
    shallower = 0
    for _ in range(3):
        member = model.resolve_member(model.sample_member(generator))
        json.dumps(member.to_dict())  # JSON-ready
        _ready(model, member, x)
        model.set_member(member)
        expected = model(x)
        small = zoo.slice(model, member).eval()
        assert small.members == [member] and small.largest == member
        assert (small(x) - expected).abs().max().item() <= 1e-5, str(member)
        assert zoo.count_params(model, member) == sum(p.numel() for p in small.parameters())
        assert zoo.count_flops(model, member) == zoo.count_flops(small)
        assert _blocks(small) <= _blocks(model)
        shallower += _blocks(small) < _blocks(model)
    assert shallower >= 1, "no sampled member skipped a block"


@pytest.mark.parametrize("name", ["slim_resnet20", "slim_gpt_nano"])
@torch.no_grad()
def test_depth_removes_blocks_and_their_parameters(name):
    model = _tiny(name)
    member = model.resolve_member({"depth": [1, 3, 2]} if "resnet" in name else {"blocks": [0, 3]})
    x = model.example_input(2, 16)
    _ready(model, member, x)
    small = zoo.slice(model, member)
    names = {n for n, _ in small.named_parameters()}
    if "resnet" in name:
        assert _blocks(small) == 6 and "stages.0.1.conv1.weight" not in names and "stages.2.1.conv1.weight" in names
    else:
        assert _blocks(small) == 2 and "blocks.3.attn.qkv.weight" in names and "blocks.1.attn.qkv.weight" not in names
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_uniform_width_is_a_point_of_the_same_space():
    model = _tiny("slim_resnet20")
    assert (
        model.resolve_member(0.5) == model.resolve_member({"width": [0.5, 0.5, 0.5], "depth": [3, 3, 3]}) == Member(0.5)
    )
    assert model.resolve_member(width=0.5).key == "w0p5"  # the names weights files always used
    vit = _tiny("slim_vit_tiny")
    assert vit.resolve_member({"heads": 0.5, "mlp": 0.5}) == Member(0.5)
    assert vit.resolve_member({"heads": 0.5, "mlp": 1.0}).to_dict() == {"heads": 0.5, "mlp": 1.0}


def test_space_is_json_ready_and_describes_every_field():
    space = _tiny("slim_resnet20", low_rank=True).space()
    json.dumps(space)
    assert space["groups"] == 3 and set(space["axes"]) == {"width", "rank", "depth"}
    assert space["axes"]["depth"]["max"] == [3, 3, 3]
    gpt = _tiny("slim_gpt_nano").space()
    assert set(gpt["axes"]) == {"heads", "mlp", "blocks"} and gpt["axes"]["blocks"]["kept_from"] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "member, message",
    [
        ({"width": [0.5, 1.0]}, r"width takes one value or a list of 3 \(one per stage\), got 2"),
        ({"width": [0.5, 1.5, 1.0]}, r"width of stage 1 must be in \(0, 1\], got 1.5"),
        ({"depth": [0, 3, 3]}, r"depth of stage 0 must be an integer in \[1, 3\], got 0"),
        ({"depth": [1.5, 3, 3]}, r"depth of stage 0 must be an integer in \[1, 3\], got 1.5"),
        ({"heads": 0.5}, r"member fields width, depth; unknown field heads"),
        ({"width": "half"}, r"member field 'width' takes numbers"),
        ({"rank": 0.5}, r"no rank axis"),
    ],
)
def test_invalid_members_name_the_field_and_what_is_allowed(member, message):
    with pytest.raises(ValueError, match=message):
        _tiny("slim_resnet20").set_member(member)


def test_invalid_transformer_members():
    vit = _tiny("slim_vit_tiny")
    with pytest.raises(ValueError, match=r"blocks must be a non-empty increasing list of block indices from \[0, 1"):
        vit.set_member({"blocks": [3, 1]})
    with pytest.raises(ValueError, match=r"list of block indices .*, got 3$"):
        vit.set_member({"blocks": 3})
    with pytest.raises(ValueError, match="give width .* or heads, not both"):
        vit.set_member({"width": 0.5, "heads": 0.5})
    small = zoo.slice(vit, {"blocks": [0, 5, 11]})
    with pytest.raises(ValueError, match=r"from \[0, 5, 11\], got \[0, 1\]"):
        small.set_member({"blocks": [0, 1]})  # a sliced member holds only its own blocks


@pytest.mark.slow  # CI exports the same kind of member of a smaller GPT: tests/test_small_exports.py
@torch.no_grad()
def test_a_structured_member_exports_to_a_verified_onnx_file(tmp_path):
    from export.onnx_export import export_member

    model = _tiny("slim_gpt_nano", low_rank=True)
    member = model.resolve_member(
        {"heads": [1, 0.5, 0.5, 1], "mlp": 0.25, "rank": [1, 0.5, 0.25, 1], "blocks": [0, 2, 3]}
    )
    result = export_member(zoo.WeightsSource(tmp_path / "none", model, "0" * 64).member(member), tmp_path / "m.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.metadata["subnet"] == member.to_dict() and result.num_params <= zoo.count_params(
        model, member
    )  # cheaper layers merged


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits-shaped ResNet-20 family whose file records its data (as a trained one does);
    its accuracy does not matter to the commands under test."""
    torch.manual_seed(0)
    model = zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8)
    return zoo.save(model, tmp_path_factory.mktemp("family") / "model.safetensors", metadata={"data": "digits"})


def test_member_flag_in_slice_and_eval(trained, tmp_path):  # `zoo bench --member`: tests/test_member_commands.py
    member = '{"width": [0.25, 0.5, 1], "depth": [1, 2, 3]}'
    sliced = tmp_path / "m.safetensors"
    done = _zoo("slice", str(trained), "--member", member, "--out", str(sliced))
    assert done.returncode == 0, done.stderr
    assert "recalibrated on digits" in done.stdout  # the file's own data, no flag needed
    small = zoo.load(sliced)
    assert small.members == [Member(width=[0.25, 0.5, 1.0], depth=[1, 2, 3])]
    evaluated = _zoo("eval", str(trained), "--member", member, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    records = json.loads(evaluated.stdout)
    assert [r["subnet"] for r in records] == [{"depth": [1, 2, 3], "width": [0.25, 0.5, 1.0]}]
    assert 0.0 <= records[0]["accuracy"] <= 1.0
    bad = _zoo("slice", str(trained), "--member", '{"depth": [4, 3, 3]}', "--out", str(tmp_path / "x.safetensors"))
    assert (
        bad.returncode == 1
        and bad.stderr.count("\n") == 1
        and "depth of stage 0 must be an integer in [1, 3], got 4" in bad.stderr
    )
    assert not (tmp_path / "x.safetensors").exists()
    both = _zoo("slice", str(trained), "--member", member, "--width", "0.5", "--out", str(tmp_path / "y.safetensors"))
    assert both.returncode == 1 and "not both" in both.stderr


def test_search_is_deterministic_per_seed_and_stays_within_budget(trained):
    from training.evaluate import MemberScorer
    from training.model_data import data_for
    from zoo.search import Budget, Evolution

    runs = []
    for _ in range(2):
        model = zoo.load(trained).eval()
        scorer = MemberScorer(model, data_for(model, "evaluate"), limit=32)

        def cost(member, model=model):
            return {"params": float(zoo.count_params(model, member)), "flops": float(zoo.count_flops(model, member))}

        budget = Budget.parse("flops=1.5M")
        result = Evolution(model, scorer, cost, budget, seed=5).run(
            population=4, generations=3, seeds=model.members[:1]
        )
        assert all(c.costs["flops"] <= 1.5e6 for c in result.candidates) and result.rejected > 0
        assert len(result.candidates) > 4  # later generations bred new members
        runs.append([(c.member, c.metric, c.costs["flops"]) for c in result.candidates])
    assert runs[0] == runs[1]
    other = Evolution(zoo.load(trained), scorer, cost, budget, seed=6).run(population=4, generations=3)
    assert [c.member for c in other.candidates] != [m for m, _, _ in runs[0]]


def test_search_command_end_to_end(trained, tmp_path):
    out = tmp_path / "search"
    done = _zoo(
        "search",
        str(trained),
        "--budget",
        "params=60k",
        "--population",
        "4",
        "--generations",
        "2",
        "--seed",
        "3",
        "--limit",
        "64",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "pareto.json").read_text())
    assert report["best"]["params"] <= 60_000 and all(
        c["params"] <= 60_000 and c["latency"] > 0 for c in report["front"]
    )
    assert report["best"] == report["front"][-1]  # the best member is the front's most accurate end
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"][0]["member"] == report["best"]["member"]
    assert manifest["members"][0]["parameters"] == report["best"]["params"]
    assert (out / manifest["members"][0]["file"]).stat().st_size > 0 and (out / "pareto.png").stat().st_size > 0
    assert [g["member"] for g in report["grid"]] == [{"width": w} for w in (0.25, 0.5, 0.75, 1.0)]
    assert report["latency_check"]["exported_ms"] > 0
    assert manifest["members"][0]["max_abs_diff"] <= 1e-4  # verified against PyTorch
    assert manifest["members"][0]["metric"] == {"accuracy": report["best"]["metric"]}  # what the search measured
    from cli.search_commands import search_file_name

    chosen = Member.from_dict(report["best"]["member"])
    assert manifest["members"][0]["file"] == search_file_name("slim_resnet20", chosen, "params", report["best"])
    assert chosen.key not in manifest["members"][0]["file"] and "-params.onnx" in manifest["members"][0]["file"]
    for value, expected in ((out / "pareto.json", report["best"]), (f"{out / 'pareto.json'}#0", report["front"][0])):
        sliced = _zoo("slice", str(trained), "--member", str(value), "--out", str(tmp_path / "m.safetensors"))
        assert sliced.returncode == 0, sliced.stderr
        assert zoo.load(tmp_path / "m.safetensors").members == [Member.from_dict(expected["member"])]
    missing = _zoo("slice", str(trained), "--member", f"{out / 'pareto.json'}#99", "--out", str(tmp_path / "n"))
    assert missing.returncode == 1 and f"the front has {len(report['front'])} entries" in missing.stderr
    bad = _zoo("search", str(trained), "--budget", "params=10", "--out", str(tmp_path / "c"))
    assert (
        bad.returncode == 1
        and "no member of slim_resnet20 fits the budget params <= 10: "
        "the smallest (depth=[1,1,1], width=0.25) has params 5142"
        in bad.stderr
    )
    assert not (tmp_path / "c").exists()  # nothing half-written
    worse = _zoo("search", str(trained), "--budget", "memory=3", "--out", str(tmp_path / "d"))
    assert worse.returncode == 1 and "--budget must be params=N" in worse.stderr


@pytest.mark.slow  # CI: structured members of small GPT, ViT and MobileNetV2 in tests/test_small_exports.py
@pytest.mark.parametrize("name", sorted(SMALL))
@torch.no_grad()
def test_a_random_member_of_every_family_exports_verified(name, tmp_path):
    from export.onnx_export import export_member

    model = _tiny(name, low_rank=True)
    member = model.resolve_member(model.sample_member(torch.Generator().manual_seed(2)))
    if model.needs_calibration(member):  # statistics from enough data that no channel's variance is tiny
        zoo.recalibrate_bn(model, [model.example_input(16) for _ in range(4)], member)
    result = export_member(zoo.WeightsSource(tmp_path / "none", model, "0" * 64).member(member), tmp_path / "m.onnx")
    assert (
        result.max_abs_diff is not None
        and result.max_abs_diff <= 1e-4
        and result.metadata["subnet"] == member.to_dict()
    )


def test_the_front_holds_the_best_member_even_among_ties():
    from zoo.search import Budget, Candidate, SearchResult

    twins = [Candidate(Member(width=w), 0.9, {"flops": 10.0}, 0) for w in (0.75, 0.5)]  # same cost, same metric
    result = SearchResult(
        Budget("flops", 20.0), "accuracy", True, [Candidate(Member(width=0.25), 0.5, {"flops": 5.0}, 0), *twins], 0
    )
    assert result.ranked()[0] in result.front() and [c.metric for c in result.front()] == [0.5, 0.9]


def test_the_pareto_plot_zooms_to_the_budget_in_plain_units_with_labels_apart():
    """Under flops=250k the front fills the plot (not 5% of an axis running to the largest
    uniform member), ticks read 100k not 1e6 offsets, and no label covers another or the star."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation

    from zoo.search import Budget, Candidate, SearchResult, draw_front

    generator = torch.Generator().manual_seed(0)
    flops = (torch.rand(30, generator=generator) * 0.2e6 + 0.05e6).tolist()
    scored = [Candidate(Member(width=0.25, depth=[1, 2, 3]), 0.6 + f / 1e6, {"flops": f}, 1) for f in flops]
    grid = [Candidate(Member(width=w), 0.8 + w / 10, {"flops": w * w * 5e6}, -1) for w in (0.25, 0.5, 0.75, 1.0)]
    grid[0].costs["flops"], grid[0].metric = 0.24e6, 0.84  # next to the chosen member
    result = SearchResult(Budget("flops", 0.25e6), "accuracy", True, scored, 0)
    best = result.ranked()[0]
    fig = draw_front(result, grid, best, f"search under {result.budget}")
    ax = fig.axes[0]
    assert 0.25e6 < ax.get_xlim()[1] <= 1.6 * 0.25e6
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "100k" in ticks and ax.xaxis.get_offset_text().get_text() == "" and "250k" in str(result.budget)
    renderer = fig.canvas.get_renderer()
    notes = {a.get_text(): a.get_window_extent(renderer) for a in ax.get_children() if isinstance(a, Annotation)}
    assert set(notes) == {"w=0.25", "w=0.5 (1.25M)", "w=0.75 (2.81M)", "w=1 (5M)"}  # beyond the zoom: with cost
    frame = ax.get_window_extent(renderer)
    star = ax.transData.transform((best.costs["flops"], best.metric))
    boxes = list(notes.values())
    for i, box in enumerate(boxes):
        assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
        assert not box.contains(*star)
        assert not any(box.overlaps(other) for other in boxes[i + 1 :])
    plt.close(fig)
