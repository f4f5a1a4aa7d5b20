"""Every catalogue model against the family contract (docs/design.md), on tiny inputs.

Parametrized over ``zoo.list_models()``, so a new family is covered the day it registers.
Models are built once per module with every norm parameter moved off its initial value (a
zero-initialised tensor would hide slicing mistakes) and, for batch-norm families, statistics
calibrated on data, so outputs are O(1) and every tensor matters.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import timm
import torch

import zoo
from zoo import catalogue
from zoo.layers import ElasticConv2d
from zoo.space import Member

ALL_NAMES = zoo.list_models()
# Variants that only resize a family whose every block another variant runs in CI (ResNet-18/50,
# ViT-Tiny/Small): building and saving 22-300 M parameters costs seconds each, so -m slow.
SIZE_VARIANTS = {"slim_resnet34", "slim_resnet101", "slim_resnet152", "slim_vit_base", "slim_vit_large"}
NAMES = [n if n not in SIZE_VARIANTS else pytest.param(n, marks=pytest.mark.slow) for n in ALL_NAMES]
WIDTHS = (0.25, 0.5, 0.75, 1.0)
LOW_RANK_SUBNETS = [Member(w, r) for w in (0.5, 1.0) for r in (0.25, 0.5, 1.0)]
BATCH, SEQ_LEN, IMG_SIZE = 2, 32, 32


def _meta_model(name: str, **kwargs) -> zoo.ElasticModel:
    with torch.device("meta"):  # shapes only: free to build
        return zoo.create_model(name, **kwargs)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_args(name: str) -> dict:
    """Arguments that shrink a catalogue model's input: 32x32 images or 32-token contexts."""
    kind = _meta_model(name).input_kind
    return {"img_size": IMG_SIZE} if kind == "image" else {"context_length": SEQ_LEN}


def _smallest_per_family() -> set[str]:
    families: dict[str, list[str]] = {}
    for name in ALL_NAMES:
        families.setdefault(zoo.family_of(name), []).append(name)
    return {min(names, key=lambda n: _num_params(_meta_model(n))) for names in families.values()}


# Low-rank construction runs an SVD per layer (seconds for the big variants): every family's
# smallest variant runs in CI, the others with -m slow.
SMALLEST = _smallest_per_family()
DENSE_ONLY = {n for n in ALL_NAMES if catalogue.MODELS[n]["axes_low_rank"] is None}  # the graph family
LOW_RANK_NAMES = [
    n if n in SMALLEST else pytest.param(n, marks=pytest.mark.slow) for n in ALL_NAMES if n not in DENSE_ONLY
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared: LAPACK's SVD and small convs are several times faster on one
    thread than on oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def example(model: zoo.ElasticModel, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.example_input(BATCH, SEQ_LEN)


def _move_off_init(model: zoo.ElasticModel) -> None:
    """Norm scales near 1, biases and zero-initialised tensors random: all of them matter."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            elif not p.any():
                p.copy_(0.02 * noise)


def _calibrate(model: zoo.ElasticModel, members: list[Member]) -> None:
    if model.uses_batchnorm:
        batch = model.example_input(4, SEQ_LEN)
        for s in members:
            zoo.recalibrate_bn(model, [batch], width=s.width, rank=s.rank)


@pytest.fixture(scope="module")
def family() -> Callable[..., zoo.ElasticModel]:
    """``family(name, low_rank=False)``: a ready model in eval mode, built once per module."""
    cache: dict[tuple[str, bool], zoo.ElasticModel] = {}

    def get(name: str, low_rank: bool = False) -> zoo.ElasticModel:
        if (name, low_rank) not in cache:
            torch.manual_seed(0)
            model = zoo.create_model(name, low_rank=low_rank, **tiny_args(name))
            _move_off_init(model)
            _calibrate(model, LOW_RANK_SUBNETS if low_rank else [Member(w) for w in WIDTHS])
            cache[name, low_rank] = model.eval()
        return cache[name, low_rank]

    yield get
    cache.clear()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _expected_shape(model: zoo.ElasticModel, num_classes: int) -> tuple[int, ...]:
    return (BATCH, num_classes) if model.input_kind == "image" else (BATCH, SEQ_LEN, num_classes)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_output_shape_at_every_width(name, family):
    model = family(name)
    for width in WIDTHS:
        model.set_member(width=width)
        out = model(example(model))
        assert out.shape == _expected_shape(model, model.num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_sliced_member_computes_what_the_family_computes(name, family):
    model = family(name)
    x = example(model)
    outputs = {}
    for width in WIDTHS:
        model.set_member(width=width)
        outputs[width] = model(x)
        small = zoo.slice(model, width=width)
        assert small.largest == Member(width) and small.members == [Member(width)]
        assert _max_diff(small(x), outputs[width]) <= 1e-5, f"width {width}"
    assert _max_diff(outputs[0.5], outputs[1.0]) > 1e-3, "switching the width changed nothing"


@pytest.mark.parametrize("name", LOW_RANK_NAMES)
@torch.no_grad()
def test_low_rank_sliced_member_computes_what_the_family_computes(name, family):
    model = family(name, low_rank=True)
    assert model.axes == (
        ("heads", "mlp", "rank", "blocks")
        if model.input_kind == "tokens" or "vit" in name
        else ("width", "rank", "depth")
    )
    x = example(model)
    outputs = {}
    for member in LOW_RANK_SUBNETS:
        model.set_member(width=member.width, rank=member.rank)
        outputs[member] = model(x)
        small = zoo.slice(model, width=member.width, rank=member.rank)
        assert small.members == [member]
        assert _num_params(small) < _num_params(model) or member == Member(1.0, 1.0)
        assert _max_diff(small(x), outputs[member]) <= 1e-5, str(member)
    assert _max_diff(outputs[Member(1.0, 0.25)], outputs[Member(1.0, 1.0)]) > 1e-3, "switching the rank changed nothing"


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_save_and_load_round_trip_family_and_member(name, family, tmp_path):
    model = family(name)
    x = example(model)
    model.set_member(width=0.5)
    expected = model(x)

    path = zoo.save(model, tmp_path / "family.safetensors", metadata={"note": "round trip"})
    header = zoo.read_header(path)
    assert (
        header["arch"] == name
        and header["axes"] == list(catalogue.MODELS[name]["axes"])
        and header["dtype"] == "float32"
    )
    assert header["subnets"] == [s.to_dict() for s in model.members]
    assert header["num_params"] == _num_params(model) and header["metadata"] == {"note": "round trip"}
    loaded = zoo.load(path).eval()
    assert loaded.zoo_metadata == {"note": "round trip"} and loaded.members == model.members
    loaded.set_member(width=0.5)
    assert torch.equal(loaded(x), expected)

    member_path = zoo.save(zoo.slice(model, width=0.5), tmp_path / "member.safetensors")
    member_header = zoo.read_header(member_path)
    assert member_header["subnets"] == [{"width": 0.5}] and member_header["model_args"]["max_member"] == {"width": 0.5}
    assert member_header["num_params"] < header["num_params"]
    assert member_path.stat().st_size < path.stat().st_size
    member = zoo.load(member_path).eval()
    assert member.active_member == Member(0.5)
    assert torch.equal(member(x), expected)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_members_shrink_and_are_nested(name, family):
    model = family(name)
    members = {w: zoo.slice(model, width=w) for w in (1.0, 0.5, 0.25)}
    counts = [_num_params(members[w]) for w in (1.0, 0.5, 0.25)]
    assert counts[0] == _num_params(model) and counts[0] > counts[1] > counts[2]

    full = dict(members[1.0].named_parameters())
    shrunk = 0
    for pname, tensor in members[0.5].named_parameters():
        module = members[0.5].get_submodule(pname.rpartition(".")[0])
        chunks = module.chunks if pname.rpartition(".")[2] in getattr(module, "chunked", ()) else 1
        source = full[pname]
        # the first rows of each of `chunks` row blocks, then the first columns
        blocks = source.reshape(chunks, source.shape[0] // chunks, *source.shape[1:])
        prefix = blocks[(slice(None), *(slice(0, n) for n in (tensor.shape[0] // chunks, *tensor.shape[1:])))]
        assert torch.equal(tensor, prefix.reshape(tensor.shape)), pname
        shrunk += tensor.shape != source.shape
    assert shrunk > 0


@pytest.mark.parametrize("name", NAMES)
def test_impossible_subnets_say_what_is_allowed(name):
    model = _meta_model(name, **tiny_args(name))
    with pytest.raises(ValueError, match="low_rank"):
        model.set_member(rank=0.5)
    for width in (0, 1.7):
        with pytest.raises(ValueError, match=r"width must be in \(0, 1\]"):
            model.set_member(width=width)
    with pytest.raises(ValueError, match="member fields width(, .*)?; unknown field kernel"):
        model.set_member(width=0.5, kernel=3)
    if name in DENSE_ONLY:
        return
    low_rank = _meta_model(name, low_rank=True, **tiny_args(name))
    with pytest.raises(ValueError, match=r"rank must be in \(0, 1\]"):
        low_rank.set_member(width=0.5, rank=0)


@pytest.mark.parametrize("name", NAMES)
def test_timm_creates_the_zoo_model(name):
    if _meta_model(name).input_kind != "image":  # timm's registry holds image models
        assert name not in timm.list_models()
        with pytest.raises(RuntimeError, match="Unknown model"):
            timm.create_model(name)
        return
    with torch.device("meta"):
        model = timm.create_model(name, **tiny_args(name))
    assert type(model) is type(_meta_model(name)) and model.arch == name
    assert model.pretrained_cfg["architecture"] == name
    assert model.model_args.items() >= tiny_args(name).items()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_timm_face_and_reset_classifier(name, family, tmp_path):
    model = copy.deepcopy(family(name))
    x = example(model)
    model.set_member()
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape[-1] == model.num_features
    model.set_member(width=0.75)
    features = model.forward_features(x)
    assert torch.equal(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape[-1] == model.num_features  # follows the member
    assert model.get_classifier().out_features == model.num_classes

    if model.input_kind == "tokens":  # a language model's classes are its vocabulary
        with pytest.raises(ValueError, match="num_classes"):
            model.reset_classifier(model.num_classes + 1)
        return
    model.reset_classifier(7)
    assert model.active_member == Member(0.75) and model.get_classifier().out_features == 7
    out = model(x)
    assert out.shape == _expected_shape(model, 7)
    path = zoo.save(model, tmp_path / "seven.safetensors")
    loaded = zoo.load(path).eval()
    loaded.set_member(width=0.75)
    assert loaded.num_classes == 7 and loaded.pretrained_cfg["num_classes"] == 7
    assert torch.equal(loaded(x), out)


def test_mobilenetv2_is_the_reference_architecture():
    assert _num_params(_meta_model("slim_mobilenetv2")) == 3_504_872  # torchvision's mobilenet_v2()
    quarter = _meta_model("slim_mobilenetv2", max_member={"width": 0.25}, widths=[0.25])
    assert quarter.stem[0].out_channels == 8 and quarter.blocks[1]["0"].expand[0].out_channels == 24  # 16 * 6 / 4
    assert (
        quarter.final_conv[0].out_channels == 1280 and quarter.classifier.in_features == 1280
    )  # fixed, as in the paper

    low_rank = _meta_model("slim_mobilenetv2", low_rank=True)
    convs = [m for m in low_rank.modules() if isinstance(m, ElasticConv2d)]
    assert len(convs) == 52 and all(c.low_rank != (c.depthwise or c is low_rank.stem[0]) for c in convs)
    assert not low_rank.classifier.low_rank
    with pytest.raises(ValueError, match="drop_rate must be in"):
        _meta_model("slim_mobilenetv2", drop_rate=1.0)
