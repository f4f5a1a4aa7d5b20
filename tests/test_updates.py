"""Update policies: each step is x <- x - lr * m ⊙ g(x + δ), checked against the rule by hand."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app
from training.masking import MaskCache, masked_step
from training.trainer import TrainConfig, train
from training.updates import create_policy, partial_gradient
from zoo import Member

LR = 0.1
ON_DEVICE = pytest.mark.usefixtures("on_exactness_device")  # ZOO_TEST_DEVICE (default cpu), see conftest.py


def _model(low_rank: bool = False) -> zoo.ElasticModel:
    torch.manual_seed(0)
    if low_rank:
        return zoo.create_model(
            "slim_resnet20", num_classes=5, img_size=8, low_rank=True, widths=[1.0], ranks=[0.5, 1.0]
        )
    return zoo.create_model("slim_resnet20", num_classes=5, img_size=8, widths=[0.5, 1.0])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=torch.get_default_device()).manual_seed(1)  # on the exactness device
    return torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator)


def _loss(model, member=None) -> torch.Tensor:
    model.set_member(member or model.largest, for_training=True)
    x, y = _batch()
    return F.cross_entropy(model(x), y)


def _grads_at(model, weights: dict[str, torch.Tensor], member=None) -> dict[str, torch.Tensor]:
    """g at ``weights``, on a copy: the reference the rule is checked against."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(weights[n])
    _loss(ref, member).backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in ref.named_parameters()}


def _policy_step(model, name: str, member=None, optimizer=None, **options):
    """One step through the trainer's path: partial_gradient, then masked_step."""
    policy = create_policy(name, model, seed=3, **options)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=LR)
    members = MaskCache(model).member(member or model.largest)

    def gradient():
        loss = _loss(model, member)
        loss.backward()
        return [loss.detach()]

    _, mask = partial_gradient(policy, gradient, members)
    masked_step(optimizer, mask)
    optimizer.zero_grad(set_to_none=True)
    return policy, mask


def _names(model, masks) -> dict[str, torch.Tensor]:
    return {n: masks[p] for n, p in model.named_parameters() if masks and p in masks}


def _expected(x, g, m) -> dict[str, torch.Tensor]:
    return {n: x[n] - LR * (g[n] * m[n] if n in m else g[n]) for n in x}


def _assert_close(model, expected) -> None:
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6, msg=n)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["full", "sam", "extragradient"])
@ON_DEVICE
def test_one_step_is_the_rule_computed_by_hand_for_gradient_perturbations(name):
    model = _model()
    x = _weights(model)
    g = _grads_at(model, x)
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in g.values()))
    delta = {
        "full": {n: 0 * v for n, v in g.items()},
        "sam": {n: 0.05 * v / norm for n, v in g.items()},
        "extragradient": {n: -0.01 * v for n, v in g.items()},
    }[name]
    perturbed = _grads_at(model, {n: x[n] + delta[n] for n in x})
    _policy_step(model, name)
    _assert_close(model, _expected(x, perturbed, {}))


@ON_DEVICE
def test_a_core_step_with_sam_is_the_rule_with_the_cores_mask_and_perturbation():
    model = _model()
    core = Member(0.5)
    x = _weights(model)
    g = _grads_at(model, x, core)  # zero outside the core: δ is too
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in g.values()))
    perturbed = _grads_at(model, {n: x[n] + 0.05 * g[n] / norm for n in x}, core)
    _, mask = _policy_step(model, "sam", core)
    m = _names(model, mask)
    assert m and all(not v.all() for v in m.values())
    _assert_close(model, _expected(x, perturbed, m))
    for n, p in model.named_parameters():  # outside the core: bit for bit
        if n in m:
            assert torch.equal(p.detach()[~m[n]], x[n][~m[n]])


@ON_DEVICE
def test_sam_equals_a_reference_two_pass_implementation():
    """The common two-pass SAM (ascend to x + ρ g/‖g‖, take the gradient there, go back, step
    the base optimizer), with momentum and weight decay, over three steps."""
    model, reference = _model(), _model()
    options = dict(lr=LR, momentum=0.9, weight_decay=5e-4)
    optimizer, base = torch.optim.SGD(model.parameters(), **options), torch.optim.SGD(reference.parameters(), **options)
    for _ in range(3):
        _policy_step(model, "sam", optimizer=optimizer, rho=0.1)
        _loss(reference).backward()
        params = [p for p in reference.parameters() if p.grad is not None]
        scale = 0.1 / (torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2) + 1e-12)
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad * scale)
        base.zero_grad()
        _loss(reference).backward()
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)
        base.step()
        base.zero_grad()
    _assert_close(model, _weights(reference))


@pytest.mark.parametrize("units", [False, True], ids=["coordinates", "units"])
@ON_DEVICE
def test_meprop_moves_exactly_the_top_k_gradient_coordinates(units):
    model = _model()
    x = _weights(model)
    g = _grads_at(model, x)
    _policy_step(model, "meprop", keep=0.25, units=units)
    for n, p in model.named_parameters():
        if units and p.dim() > 1:
            rows = g[n].flatten(1).norm(dim=1)
            chosen = torch.zeros_like(rows, dtype=torch.bool).index_fill_(
                0, rows.topk(max(1, int(0.25 * rows.numel() + 0.5))).indices, True
            )
            chosen = chosen.view(-1, *[1] * (p.dim() - 1)).expand_as(p)
        else:
            k = max(1, int(0.25 * p.numel() + 0.5))
            chosen = (
                torch.zeros(p.numel(), dtype=torch.bool)
                .index_fill_(0, g[n].abs().flatten().topk(k).indices, True)
                .view_as(p)
            )
        assert torch.equal(p.detach()[~chosen], x[n][~chosen]), n  # nothing else moves, bit for bit
        torch.testing.assert_close(p.detach()[chosen], (x[n] - LR * g[n])[chosen], rtol=1e-5, atol=1e-7)
        assert chosen.float().mean() <= 0.25 + 1 / p.shape[0]


@pytest.mark.parametrize("name", ["unit-dropout", "rank-dropout"])
@ON_DEVICE
def test_structured_dropout_is_the_rule_with_delta_minus_one_minus_m_times_x(name):
    model = _model(low_rank=name == "rank-dropout")
    x = _weights(model)
    policy, mask = _policy_step(model, name)
    m = _names(model, mask)
    assert m and all(v.any() and not v.all() for v in m.values())
    dropped_point = {n: torch.where(m[n], x[n], torch.zeros_like(x[n])) if n in m else x[n] for n in x}
    _assert_close(model, _expected(x, _grads_at(model, dropped_point), m))
    if name == "unit-dropout":  # a conv and its batch norm drop the same channels; half of each layer's units stay
        conv, bn = model.get_submodule("stages.0.0.conv1"), model.get_submodule("stages.0.0.bn1")
        rows = mask[conv.weight].flatten(1).any(dim=1)
        assert torch.equal(rows, mask[bn.weight]) and torch.equal(rows, mask[bn.bias])
        assert int(rows.sum()) == round(0.5 * rows.numel())
        assert torch.equal(
            mask[model.get_submodule("stages.0.0.conv2").weight].any(dim=0).flatten(1).any(dim=1), rows
        )  # the columns that read them


@pytest.mark.parametrize(
    "name, optimizer", [("unit-dropout", "sgd"), ("unit-dropout", "adamw"), ("rank-dropout", "sgd")]
)
@ON_DEVICE
def test_dropped_units_and_their_optimizer_state_do_not_move(name, optimizer):
    model = _model(low_rank=name == "rank-dropout")
    opt = (
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.05)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=0.01)
    )
    _policy_step(model, "full", optimizer=opt)  # populate momentum / moments everywhere
    before = {
        p: (
            p.detach().clone(),
            {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape},
        )
        for p in model.parameters()
    }
    _, mask = _policy_step(model, name, optimizer=opt)
    moved_inside = 0
    for p, (old, state) in before.items():
        if p in mask:
            m = mask[p]
            assert torch.equal(p.detach()[~m], old[~m])
            assert all(torch.equal(opt.state[p][k][~m], v[~m]) for k, v in state.items())
            moved_inside += int(not torch.equal(p.detach()[m], old[m]))
    assert moved_inside >= len(mask) // 2


def test_alignment_logging_leaves_the_run_unchanged_and_measures_the_condition(tmp_path, exactness_device):
    case = dict(
        model="slim_resnet20",
        device=exactness_device,
        strategy="alternating",
        widths=[0.5],
        update="unit-dropout",
        steps=4,
        batch_size=32,
        eval_every=2,
    )
    plain = train(TrainConfig.from_flags(out=str(tmp_path / "plain"), **case))
    logged = train(TrainConfig.from_flags(out=str(tmp_path / "logged"), log_alignment=2, **case))
    expected, got = load_file(plain.model_path), load_file(logged.model_path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    records = [json.loads(line) for line in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    alignment = [r for r in records if "alignment_cosine" in r]
    assert [r["step"] for r in alignment] == [0, 2]
    assert all(
        0 < r["alignment_cosine"] < 0.99 and 0 < r["alignment_norm_ratio"] < 1 and r["alignment_s"] > 0
        for r in alignment
    )

    full = train(
        TrainConfig.from_flags(out=str(tmp_path / "full"), log_alignment=2, **{**case, "update": "full", "steps": 2})
    )
    records = [json.loads(line) for line in (full.out / "metrics.jsonl").read_text().splitlines()]
    (step0,) = [r for r in records if "alignment_cosine" in r]  # step 0 trains the full model: m ⊙ g(x + δ) = g(x)
    assert step0["alignment_cosine"] == pytest.approx(1.0) and step0["alignment_norm_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["unit-dropout", "rank-dropout"])
def test_resume_with_random_policies_is_bit_identical(case, tmp_path, exactness_device):
    config = dict(model="slim_resnet20", device=exactness_device, steps=6, batch_size=32, eval_every=2, log_alignment=3)
    config |= (
        dict(strategy="random", widths=[0.5], update="unit-dropout")
        if case == "unit-dropout"
        else dict(strategy="separate", low_rank=True, update="rank-dropout", keep=0.5)
    )
    whole = train(TrainConfig.from_flags(out=str(tmp_path / "whole"), **config))
    train(TrainConfig.from_flags(out=str(tmp_path / "parts"), stop_after=3, **config))
    resumed = train(TrainConfig.from_flags(out=str(tmp_path / "parts"), resume=True, **config))
    expected, got = load_file(whole.model_path), load_file(resumed.model_path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    def timeless(path):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("samples_per_s", "alignment_s")}
            for line in path.read_text().splitlines()
        ]

    assert timeless(tmp_path / "parts" / "metrics.jsonl") == timeless(tmp_path / "whole" / "metrics.jsonl")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--update", "sam", "--keep", "0.5"],
            "--keep applies to --update meprop or unit-dropout or rank-dropout, not sam",
        ),
        (["--rho", "0.1"], "--rho applies to --update sam, not full"),
        (["--update", "meprop", "--eg-lr", "0.1"], "--eg-lr applies to --update extragradient, not meprop"),
        (["--update", "unit-dropout", "--meprop-units"], "--meprop-units applies to --update meprop"),
        (["--update", "sam", "--rho", "0"], "--rho must be positive"),
        (["--update", "extragradient", "--eg-lr", "-1"], "--eg-lr must be positive"),
        (["--update", "meprop", "--keep", "0"], "--keep must be in (0, 1]"),
        (["--update", "unit-dropout", "--keep", "1.5"], "--keep must be in (0, 1]"),
        (["--update", "rank-dropout", "--strategy", "separate"], "needs a family with factorized layers (--low-rank)"),
        (
            ["--update", "rank-dropout", "--low-rank"],
            "with --strategy alternating: it draws a nested sub-network per step",
        ),
        (["--update", "unit-dropout", "--nested", "--strategy", "sandwich"], "--nested with --strategy sandwich"),
        (["--log-alignment", "0"], "--log-alignment must be at least 1"),
    ],
)
def test_meaningless_combinations_and_bad_values_are_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, ["train", "slim_resnet20", *args, "--out", str(tmp_path / "run")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0]


@ON_DEVICE
def test_batches_and_models_are_made_on_the_exactness_device(exactness_device):
    x, y = _batch()
    assert x.device == y.device == next(_model().parameters()).device == torch.device(exactness_device)
