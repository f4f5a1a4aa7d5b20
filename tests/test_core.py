"""zoo's core, apart from any one family: rounding, elastic layers, batch-norm statistics,
masks, FLOPs, weights files and the catalogue command."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import zoo
from zoo.layers import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from zoo.space import Dim, Member, fixed, rank_count

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared; these small ops run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----- rounding ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dim, width, expected",
    [
        (Dim(16, divisor=4), 0.25, 4),
        (Dim(16, divisor=4), 0.5, 8),
        (Dim(16, divisor=4), 0.75, 12),
        (Dim(16, divisor=4), 1.0, 16),
        (Dim(24, divisor=8), 0.5, 16),  # 1.5 divisors: half rounds up
        (Dim(32, divisor=8), 0.3, 8),  # 1.2 divisors round down
        (Dim(64, divisor=8), 0.05, 8),  # never below one divisor
        (Dim(20, divisor=8), 1.0, 20),  # never above the full size
        (Dim(3), 0.25, 1),  # slim_vit_tiny's heads: 1, 2, 2, 3
        (Dim(3), 0.5, 2),
        (Dim(3), 0.75, 2),
        (Dim(3), 1.0, 3),
        (Dim(3, unit_size=64), 0.5, 128),  # features = heads x head dim
        (fixed(10), 0.25, 10),
    ],
)
def test_dim_count_rounding(dim, width, expected):
    assert dim.count(width) == expected


@pytest.mark.parametrize(
    "rank, m, n, expected",
    [(1.0, 16, 64, 16), (0.5, 16, 64, 8), (0.25, 10, 100, 3), (0.3, 10, 10, 3), (0.01, 4, 4, 1)],
)
def test_rank_count(rank, m, n, expected):
    assert rank_count(rank, m, n) == expected


# ----- elastic layers ---------------------------------------------------------------------
def test_low_rank_linear_is_the_dense_layer_at_full_rank_and_its_best_approximation_below():
    torch.manual_seed(0)
    dense = ElasticLinear(fixed(24), fixed(16))
    torch.manual_seed(0)
    low = ElasticLinear(fixed(24), fixed(16), low_rank=True)
    assert low.u.shape == (16, 16) and low.v.shape == (16, 24)
    torch.testing.assert_close(low.u @ low.v, dense.weight, atol=1e-6, rtol=0)
    x = torch.randn(5, 24)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=0)

    low.set_member({"rank": (0.5,)}, "r0p5")  # 8 components: the best rank-8 approximation (Eckart-Young)
    u, s, vh = torch.linalg.svd(dense.weight.detach().double())
    best = ((u[:, :8] * s[:8]) @ vh[:8]).float()
    torch.testing.assert_close(low(x), x @ best.T, atol=1e-5, rtol=0)


def test_low_rank_conv_is_the_dense_conv_at_full_rank():
    torch.manual_seed(0)
    dense = ElasticConv2d(fixed(4), fixed(6), 3, stride=2)
    torch.manual_seed(0)
    low = ElasticConv2d(fixed(4), fixed(6), 3, stride=2, low_rank=True)
    kernel = (low.u.flatten(1) @ low.v.flatten(1)).reshape(dense.weight.shape)
    torch.testing.assert_close(kernel, dense.weight, atol=1e-6, rtol=0)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("low_rank", [False, True])
def test_fused_linear_slices_each_chunk(low_rank):
    torch.manual_seed(0)
    qkv = ElasticLinear(fixed(8), Dim(4, unit_size=2), chunks=3, low_rank=low_rank)  # 3 x 4 heads of 2
    nn.init.normal_(qkv.bias)
    qkv.set_member({"width": (0.5,), "rank": (0.5,)}, "w0p5")  # 2 heads of 2 in each of q, k, v
    rows = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    x = torch.randn(5, 8)
    if low_rank:
        r = rank_count(0.5, 12, 8)
        expected = (x @ qkv.v[:r].T) @ qkv.u[rows, :r].T + qkv.bias[rows]
    else:
        expected = x @ qkv.weight[rows].T + qkv.bias[rows]
    assert qkv(x).shape == (5, 12)
    torch.testing.assert_close(qkv(x), expected, atol=1e-6, rtol=0)


# ----- batch-norm statistics --------------------------------------------------------------
def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".running_" in k}


def test_batchnorm_statistics_are_private_to_each_subnet():
    model = zoo.create_model("slim_resnet20").train()
    before = _stats(model)
    model.set_member(width=0.5)
    model(_images())
    after = _stats(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith("_w0p5")}
    assert len(changed) == 2 * sum(isinstance(m, ElasticBatchNorm2d) for m in model.modules())


def test_recalibration_makes_a_width_outside_the_grid_usable(tmp_path):
    model = zoo.create_model("slim_resnet20").eval()
    with pytest.raises(ValueError, match="no batch-norm statistics for width=0.6.*recalibrate"):
        model.set_member(width=0.6)
    batches = [_images(8, seed) for seed in range(3)]
    assert zoo.recalibrate_bn(model, batches, width=0.6) == Member(0.6)
    assert not model.training and model.active_member == Member(1.0)  # the model is left as it was

    model.set_member(width=0.6)
    stem_conv, stem_bn = model.stem[0], model.stem[1]
    with torch.no_grad():
        activations = [stem_conv(b) for b in batches]
    # the exact average over batches of each batch's mean and (unbiased) variance
    mean = torch.stack([a.mean((0, 2, 3)) for a in activations]).mean(0)
    var = torch.stack([a.var((0, 2, 3)) for a in activations]).mean(0)
    torch.testing.assert_close(stem_bn.running_mean_w0p6, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stem_bn.running_var_w0p6, var, atol=1e-6, rtol=1e-5)

    first = {k: v for k, v in _stats(model).items() if k.endswith("_w0p6")}
    zoo.recalibrate_bn(model, batches, width=0.6)
    second = {k: v for k, v in _stats(model).items() if k.endswith("_w0p6")}
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    out = model(_images(2, 9))
    loaded = zoo.load(zoo.save(model, tmp_path / "calibrated.safetensors")).eval()
    loaded.set_member(width=0.6)  # the added member and its statistics travel with the file
    assert torch.equal(loaded(_images(2, 9)), out)


def test_subnet_context_restores_the_previous_subnet():
    model = zoo.create_model("slim_resnet20")
    model.set_member(width=0.5)
    with zoo.use_member(model, width=0.25) as chosen:
        assert chosen == Member(0.25) and model.active_member == chosen and model.fc.key == chosen.key
    assert model.active_member == Member(0.5) and model.fc.key == Member(0.5).key
    with pytest.raises(RuntimeError, match="inside"):
        with zoo.use_member(model, width=0.75):
            raise RuntimeError("inside")
    assert model.active_member == Member(0.5)


# ----- masks and FLOPs --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, member",
    [
        ("slim_resnet20", {"low_rank": True}, Member(0.5, 0.5)),
        ("slim_mobilenetv2", {"img_size": 32, "num_classes": 10}, Member(0.25)),  # depthwise
        ("slim_vit_tiny", {"img_size": 32, "num_classes": 10}, Member(0.5)),  # fused qkv
    ],
)
def test_parameter_masks_cover_exactly_what_the_subnet_trains(name, kwargs, member):
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).train()
    for module in model.modules():
        if isinstance(module, ElasticBatchNorm2d):
            nn.init.ones_(module.weight)  # zero-initialised scales would stop gradients
    model.set_member(member)
    model(_images()).square().mean().backward()

    masks = zoo.parameter_masks(model, member)
    params = dict(model.named_parameters())
    assert masks.keys() == params.keys()
    reached = 0
    for pname, p in params.items():
        assert masks[pname].shape == p.shape
        assert not p.grad[~masks[pname]].any(), f"{pname} has gradient outside its mask"
        reached += int(p.grad[masks[pname]].ne(0).sum())
    covered = sum(int(m.sum()) for m in masks.values())
    assert covered == _num_params(zoo.slice(model, member))
    assert reached > 0.9 * covered  # the mask is not larger than what the gradient reaches


def test_count_flops_shrinks_with_width_and_equals_the_sliced_model():
    model = zoo.create_model("slim_resnet20")
    flops = {}
    for width in (1.0, 0.5, 0.25):
        model.set_member(width=width)
        flops[width] = zoo.count_flops(model)
        assert flops[width] == zoo.count_flops(zoo.slice(model, width=width))
    assert 80e6 < flops[1.0] < 84e6  # ResNet-20: 40.8 M multiply-adds
    assert flops[1.0] > flops[0.5] > flops[0.25]
    assert 0.24 < flops[0.5] / flops[1.0] < 0.27  # convs shrink in both channel counts
    assert zoo.count_flops(model, batch_size=3) == 3 * flops[0.25]


# ----- weights files ----------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    return zoo.save(zoo.create_model("slim_resnet20"), tmp_path / "resnet20.safetensors")


def _with_header(saved: Path, out: Path, **changes) -> Path:
    """``saved``'s tensors under an edited zoo header."""
    header = {**zoo.read_header(saved), **changes}
    save_file(load_file(saved), out, metadata={"zoo": json.dumps(header)})
    return out


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda saved, d: d / "absent.safetensors", "no such weights file"),
        (
            lambda saved, d: _write(d / "zip.safetensors", b"PK\x03\x04 not safetensors" * 20),
            "not a readable safetensors file",
        ),
        (lambda saved, d: _write(d / "cut.safetensors", saved.read_bytes()[:-1000]), "not a readable safetensors file"),
        (
            lambda saved, d: (save_file({"w": torch.zeros(2)}, d / "plain.safetensors"), d / "plain.safetensors")[1],
            "not a zoo weights file",
        ),
        (
            lambda saved, d: (
                save_file(load_file(saved), d / "json.safetensors", metadata={"zoo": '{"arch": '}),
                d / "json.safetensors",
            )[1],
            "corrupt zoo header",
        ),
        (
            lambda saved, d: _with_header(
                saved, d / "width.safetensors", model_args={"max_member": {"width": 0.5}, "widths": [0.5]}
            ),
            "do not match its header",
        ),
        (
            lambda saved, d: _with_header(saved, d / "arch.safetensors", arch="slim_resnet56"),
            "do not match its header: missing",
        ),
        (
            lambda saved, d: _with_header(saved, d / "nope.safetensors", arch="slim_nope"),
            "does not describe a buildable model.*unknown model",
        ),
    ],
    ids=[
        "missing",
        "not-safetensors",
        "truncated",
        "no-zoo-header",
        "corrupt-json",
        "other-width",
        "other-arch",
        "unknown-arch",
    ],
)
def test_bad_weights_files_raise_one_line_errors(saved, tmp_path, make, message):
    path = make(saved, tmp_path)
    with pytest.raises(zoo.WeightsFileError, match=message) as err:
        zoo.load(path)
    assert "\n" not in str(err.value) and path.name in str(err.value)


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    original = saved.read_bytes()
    other = zoo.create_model("slim_resnet20", widths=[1.0])
    with pytest.raises(ValueError, match="dtype must be one of"):
        zoo.save(other, saved, dtype="int8")

    real_write = Path.write_bytes

    def disk_full(path, data):  # the disk fills up half-way through the write
        real_write(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match=f"^cannot write {re.escape(str(saved))}: No space left on device$"):
        zoo.save(other, saved)
    assert saved.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]  # no temporary file left behind


def test_float16_weights_are_half_the_size_and_load_back(saved, tmp_path):
    model = zoo.load(saved).eval()
    half = zoo.save(model, tmp_path / "half.safetensors", dtype="float16")
    assert 0.45 < half.stat().st_size / saved.stat().st_size < 0.55
    assert zoo.read_header(half)["dtype"] == "float16"
    loaded = zoo.load(half).eval()
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert q.dtype == p.dtype and torch.equal(q, p.half().to(p.dtype)), name
    x = _images(2)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-2, rtol=1e-2)


# ----- catalogue --------------------------------------------------------------------------
def test_zoo_list_prints_every_catalogue_name():
    from typer.testing import CliRunner

    import cli.commands  # noqa: F401  (registers the commands defined in other modules)
    from cli.app import app

    names = zoo.list_models()
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in names)
    filtered = CliRunner().invoke(app, ["list", "slim_resnet*"], env={"COLUMNS": "200"})
    assert filtered.exit_code == 0 and "slim_resnet20" in filtered.output and "slim_mobilenetv2" not in filtered.output

    proc = subprocess.run(
        [sys.executable, "-m", "cli", "list"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in names)


def test_create_model_refuses_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="unknown model 'nope'; known: .*slim_resnet20"):
        zoo.create_model("nope")
    with pytest.raises(ValueError, match="slim_resnet20: got an unexpected keyword argument 'bogus'"):
        zoo.create_model("slim_resnet20", bogus=1)


def test_saved_files_get_the_usual_permissions(tmp_path):
    """safetensors creates 0600 files; zoo's files follow the umask like any other file."""
    mask = os.umask(0o022)
    try:
        path = zoo.save(zoo.create_model("slim_resnet20", widths=[1.0]), tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
