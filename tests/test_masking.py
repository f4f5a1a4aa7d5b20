"""Masked updates are exact: on a core step, nothing outside the core changes, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from training.masking import MaskCache, masked_step
from zoo import Member

pytestmark = pytest.mark.usefixtures("on_exactness_device")  # ZOO_TEST_DEVICE (default cpu), see conftest.py


def _model(low_rank: bool) -> zoo.ElasticModel:
    torch.manual_seed(0)
    if low_rank:
        return zoo.create_model(
            "slim_resnet20", num_classes=5, img_size=8, low_rank=True, widths=[1.0], ranks=[0.5, 1.0]
        )
    return zoo.create_model("slim_resnet20", num_classes=5, img_size=8, widths=[0.5, 1.0])


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _train_step(model, optimizer, member: Member, masks) -> None:
    model.set_member(member)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    masked_step(optimizer, masks)


def _snapshot(model, optimizer) -> dict[str, torch.Tensor]:
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape:
                out[f"{key}:{names[p]}"] = value.clone()
    return out


def _outside_and_inside(model, masks, before, after):
    """(all out-of-mask coordinates equal, number of tensors whose in-mask part moved)."""
    names = {n: masks.get(p) for n, p in model.named_parameters()}
    outside_equal, moved = True, 0
    for key, old in before.items():
        mask = names[key.split(":", 1)[1]]
        new = after[key]
        if mask is None:
            continue
        outside_equal &= torch.equal(old[~mask], new[~mask])
        moved += int(not torch.equal(old[mask], new[mask]))
    return outside_equal, moved


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("low_rank", [False, True], ids=["width-core", "rank-core"])
def test_core_steps_leave_everything_outside_the_core_bit_identical(kind, low_rank):
    model = _model(low_rank)
    optimizer = _optimizer(kind, model)
    core = Member(0.5) if not low_rank else Member(1.0, 0.5)
    cache = MaskCache(model)
    masks = cache.member(core)
    assert masks and all(not m.all() and m.any() for m in masks.values())
    for _ in range(2):  # full steps populate momentum / moments everywhere
        _train_step(model, optimizer, model.largest, cache.member(model.largest))
    before = _snapshot(model, optimizer)
    steps_before = {n: float(optimizer.state[p].get("step", 0)) for n, p in model.named_parameters()}
    for _ in range(3):
        _train_step(model, optimizer, core, masks)
    after = _snapshot(model, optimizer)
    outside_equal, moved = _outside_and_inside(model, masks, before, after)
    assert outside_equal
    assert moved >= len(masks)  # each masked parameter's core part (and its state) moved
    # Parameters the core covers completely are unmasked and move like plain training.
    full_params = [n for n, p in model.named_parameters() if p not in masks]
    assert full_params and all(not torch.equal(before[f"param:{n}"], after[f"param:{n}"]) for n in full_params)
    if kind == "adamw":  # the step counter is per tensor: it advances for masked tensors too
        name, p = next((n, p) for n, p in model.named_parameters() if p in masks)
        assert float(optimizer.state[p]["step"]) == steps_before[name] + 3


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_without_the_mask_the_same_steps_would_move_the_outside(kind):
    """The control for the test above: weight decay and momentum do move unused coordinates."""
    model = _model(False)
    optimizer = _optimizer(kind, model)
    masks = MaskCache(model).member(Member(0.5))
    for _ in range(2):
        _train_step(model, optimizer, model.largest, None)
    before = _snapshot(model, optimizer)
    for _ in range(3):
        _train_step(model, optimizer, Member(0.5), None)
    outside_equal, _ = _outside_and_inside(model, masks, before, _snapshot(model, optimizer))
    assert not outside_equal


def test_first_step_a_core_step_leaves_fresh_state_zero_outside():
    model = _model(False)
    optimizer = _optimizer("sgd", model)
    masks = MaskCache(model).member(Member(0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model, optimizer, Member(0.5), masks)
    for name, p in model.named_parameters():
        if p in masks:
            outside = ~masks[p]
            assert torch.equal(p.detach()[outside], before[name][outside])
            assert torch.count_nonzero(optimizer.state[p]["momentum_buffer"][outside]) == 0


def test_mask_union_of_a_step():
    model = zoo.create_model("slim_resnet20", num_classes=5, img_size=8, widths=[0.25, 0.5, 1.0])
    cache = MaskCache(model)
    quarter, half = cache.member(Member(0.25)), cache.member(Member(0.5))
    union = cache.union([Member(0.25), Member(0.5)])
    assert union.keys() == half.keys() and all(torch.equal(union[p], half[p] | quarter[p]) for p in union)
    assert cache.union([Member(0.25), model.largest]) is None
    assert cache.union([Member(0.5)]) is half  # cached


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_structured_core_that_skips_blocks_leaves_them_bit_identical(kind):
    """A member narrower in one stage and shallower in another: the skipped blocks' parameters,
    and their momentum or moments, do not move; the member's own parameters do."""
    model = _model(False)
    optimizer = _optimizer(kind, model)
    core = model.resolve_member({"width": [0.5, 1, 0.5], "depth": [3, 1, 2]})
    cache = MaskCache(model)
    masks = cache.member(core)
    skipped = [n for n, p in model.named_parameters() if n.startswith(("stages.1.1.", "stages.1.2.", "stages.2.2."))]
    assert skipped and all(not masks[dict(model.named_parameters())[n]].any() for n in skipped)
    for _ in range(2):
        _train_step(model, optimizer, model.largest, None)
    before = _snapshot(model, optimizer)
    for _ in range(3):
        model.train()
        model.set_member(core, for_training=True)  # a drawn member: batch statistics
        x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        masked_step(optimizer, masks)
    after = _snapshot(model, optimizer)
    outside_equal, moved = _outside_and_inside(model, masks, before, after)
    assert outside_equal and moved > 0
    assert all(torch.equal(before[f"param:{n}"], after[f"param:{n}"]) for n in skipped)
    assert not torch.equal(before["param:stages.0.2.conv1.weight"], after["param:stages.0.2.conv1.weight"])


def test_models_and_batches_are_made_on_the_exactness_device(exactness_device):
    assert next(_model(low_rank=False).parameters()).device == torch.device(exactness_device)
    assert torch.randn(2).device == torch.device(exactness_device)


def _scattered(masks):
    """The same boxes with their channels at scattered positions (as another channel order)."""
    out = {}
    for p, m in masks.items():
        for axis in range(min(2, m.dim())):
            m = m.index_select(axis, torch.randperm(m.shape[axis], generator=torch.Generator().manual_seed(axis)))
        out[p] = m
    return out


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("scattered", [False, True], ids=["prefix-box", "index-box"])
def test_a_box_step_equals_the_whole_tensor_step(kind, scattered):
    """The fast path (each tensor's box stepped alone) leaves the parameters and optimizer state
    the generic path leaves (whole tensors stepped, the outside put back)."""
    from training.masking import _box

    models = [_model(False), _model(False)]
    masks = MaskCache(models[0]).member(Member(0.5))
    assert all(_box(m) is not None for m in (_scattered(masks) if scattered else masks).values())
    optimizers = [_optimizer(kind, model) for model in models]
    optimizers[1].__class__ = type("WholeTensor", (type(optimizers[1]),), {})  # not known to be elementwise
    for step in range(3):
        for model, optimizer in zip(models, optimizers):
            masks = MaskCache(model).member(Member(0.5))
            torch.manual_seed(step)
            if step == 0:  # a full step first: state everywhere
                _train_step(model, optimizer, model.largest, None)
            else:
                _train_step(model, optimizer, Member(0.5), _scattered(masks) if scattered else masks)
    first, second = _snapshot(models[0], optimizers[0]), _snapshot(models[1], optimizers[1])
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], rtol=1e-6, atol=1e-7), key


def test_a_mask_that_is_no_box_takes_the_whole_tensor_path():
    from training.masking import _box

    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[:2, :2] = True
    assert _box(mask) == (slice(0, 2), slice(0, 2))
    mask[3, 2] = True  # two blocks: the product of its axes would hold (3, 0) too
    assert _box(mask) is None
