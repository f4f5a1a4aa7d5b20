"""Which members each strategy trains: counts, determinism, resumability, and the baseline."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import zoo
from training.strategies import LayerwiseSpace, Pass, create_strategy, members_for
from training.trainer import TrainConfig, train
from zoo import Member

FULL = Member(1.0)
WIDTHS = [Member(0.25), Member(0.5), Member(0.75), FULL]


def _plans(strategy, steps: int, start: int = 0) -> list[list[Pass]]:
    return [strategy.plan(t) for t in range(start, start + steps)]


def _meta(name: str = "slim_resnet20", **kwargs) -> zoo.ElasticModel:
    with torch.device("meta"):
        return zoo.create_model(name, **kwargs)


def test_members_are_the_product_plus_the_full_model_for_joint_strategies():
    dense, low_rank = _meta(), _meta(low_rank=True)
    assert members_for("alternating", [0.5], None, dense) == [Member(0.5), FULL]
    low = members_for("all", [0.5, 1.0], [0.25], low_rank)
    assert low == [Member(0.5, 0.25), Member(1.0, 0.25), Member(1.0, 1.0)]
    assert members_for("separate", [0.5], None, dense) == [Member(0.5)]
    shallow = members_for("alternating", [], None, dense, extra=[{"width": [0.5, 1, 1], "depth": [1, 3, 3]}])
    assert shallow == [Member(width=[0.5, 1.0, 1.0], depth=[1, 3, 3]), FULL]
    with pytest.raises(ValueError, match="unknown strategy"):
        members_for("greedy", [0.5], None, dense)
    with pytest.raises(ValueError, match="depth of stage 0 must be an integer in \\[1, 3\\]"):
        members_for("alternating", [], None, dense, extra=[{"depth": [4, 3, 3]}])


def test_layerwise_space_draws_every_stage_independently_and_resumes():
    model = _meta()
    space = LayerwiseSpace(model)
    strategy = create_strategy("random", [FULL], FULL, seed=0, space=space)
    first = _plans(strategy, 50)
    drawn = [plan[0].member for plan in first]
    assert len(set(drawn)) > 40 and any(not s.is_uniform for s in drawn)
    assert {d for s in drawn for d in model.expand(s)["depth"]} == {1, 2, 3}
    assert {w for s in drawn for w in model.expand(s)["width"]} == {0.25, 0.5, 0.75, 1.0}
    state = strategy.state_dict()
    later = _plans(strategy, 20, start=50)
    again = create_strategy("random", [FULL], FULL, seed=0, space=space)
    assert _plans(again, 50) == first  # seeded
    again.load_state_dict(state)
    assert _plans(again, 20, start=50) == later  # resumes where it was

    sandwich = create_strategy("sandwich", [FULL], FULL, seed=0, num_random=2, space=space)
    plan = sandwich.plan(0)
    assert (
        plan[0] == Pass(FULL) and plan[1] == Pass(Member(width=0.25, depth=[1, 1, 1]), distill=True) and len(plan) == 4
    )
    with pytest.raises(ValueError, match="--space layerwise applies to"):
        create_strategy("alternating", [Member(0.5), FULL], FULL, seed=0, space=space)


def test_alternating_switches_between_full_and_core_steps():
    strategy = create_strategy("alternating", WIDTHS, FULL, seed=0)
    plans = _plans(strategy, 1200)
    chosen = [plan[0].member for plan in plans]
    assert all(len(plan) == 1 and not plan[0].distill for plan in plans)
    assert chosen[0::2] == [FULL] * 600  # full, core, full, core, ...
    cores = Counter(chosen[1::2])
    assert FULL not in cores and set(cores) == set(WIDTHS[:3])
    assert all(150 <= n <= 250 for n in cores.values())  # a core step picks one core uniformly


def test_core_prob_sets_the_exact_fraction_of_core_steps():
    strategy = create_strategy("alternating", [Member(0.5), FULL], FULL, seed=0, core_prob=0.25)
    chosen = [plan[0].member for plan in _plans(strategy, 1000)]
    assert chosen.count(Member(0.5)) == 250
    assert chosen[:8] == [FULL, FULL, FULL, Member(0.5)] * 2
    with pytest.raises(ValueError, match="core-prob"):
        create_strategy("alternating", [Member(0.5), FULL], FULL, seed=0, core_prob=1.0)
    with pytest.raises(ValueError, match="needs a core"):
        create_strategy("alternating", [FULL], FULL, seed=0)


def test_sandwich_trains_largest_smallest_and_distinct_random_members():
    members = [Member(w) for w in (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)]
    strategy = create_strategy("sandwich", members, FULL, seed=3, num_random=2)
    middle = Counter()
    for plan in _plans(strategy, 1000):
        assert plan[0] == Pass(FULL) and plan[1] == Pass(Member(0.25), distill=True)
        rest = [p.member for p in plan[2:]]
        assert len(rest) == len(set(rest)) == 2 and all(p.distill for p in plan[2:])
        middle.update(rest)
    assert set(middle) == set(members[1:-1])
    assert all(300 <= n <= 500 for n in middle.values())  # 2 of 5, uniformly: 400 each


def test_all_trains_every_member_and_random_samples_one_uniformly():
    plans = _plans(create_strategy("all", WIDTHS, FULL, seed=0), 5)
    assert all({p.member for p in plan} == set(WIDTHS) and len(plan) == 4 for plan in plans)
    counts = Counter(plan[0].member for plan in _plans(create_strategy("random", WIDTHS, FULL, seed=0), 2000))
    assert set(counts) == set(WIDTHS) and all(400 <= n <= 600 for n in counts.values())


@pytest.mark.parametrize("name", ["alternating", "sandwich", "random"])
def test_choices_are_determined_by_the_seed_and_resume_from_the_state(name):
    members = [Member(w) for w in (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)]
    a, b, c = (create_strategy(name, members, FULL, seed=s) for s in (7, 7, 8))
    assert _plans(a, 200) == _plans(b, 200)
    assert _plans(c, 200) != _plans(create_strategy(name, members, FULL, seed=7), 200)
    state = a.state_dict()
    expected = _plans(a, 50, start=200)
    resumed = create_strategy(name, members, FULL, seed=0)
    resumed.load_state_dict(state)
    assert _plans(resumed, 50, start=200) == expected


def test_separate_needs_exactly_one_member():
    assert _plans(create_strategy("separate", [Member(0.5)], FULL, seed=0), 3) == [[Pass(Member(0.5))]] * 3
    with pytest.raises(ValueError, match="exactly one member"):
        create_strategy("separate", [Member(0.5), FULL], FULL, seed=0)


def test_separate_training_moves_only_its_member(tmp_path):
    """The baseline trains one member alone: every coordinate outside it keeps its initial value."""
    torch.manual_seed(1)
    start = zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8, widths=[0.5])
    zoo.save(start, tmp_path / "start.safetensors")
    config = TrainConfig.from_flags(
        model="slim_resnet20",
        out=str(tmp_path / "run"),
        strategy="separate",
        widths=[0.5],
        steps=3,
        batch_size=32,
        init=str(tmp_path / "start.safetensors"),
    )
    result = train(config)
    trained = zoo.load(result.model_path)
    assert trained.members == [Member(0.5)] and [m["subnet"] for m in result.metrics] == [{"width": 0.5}]
    masks = zoo.parameter_masks(trained, Member(0.5))
    before = dict(start.named_parameters())
    moved = 0
    for name, p in trained.named_parameters():
        outside = ~masks[name]
        assert torch.equal(p.detach()[outside], before[name].detach()[outside]), name
        moved += int(not torch.equal(p.detach()[masks[name]], before[name].detach()[masks[name]]))
    assert moved > len(masks) // 2
