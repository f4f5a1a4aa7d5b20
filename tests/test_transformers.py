"""Transformer-specific behaviour of the ViT and GPT families: heads, fused QKV slicing,
causality, sequence lengths, parity with timm's parameter counts, and a short overfit."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo

TEXT = b"the quick brown fox jumps over the lazy dog. " * 4


def small_vit(**kwargs):
    return zoo.create_model("slim_vit_tiny", img_size=32, num_classes=10, **kwargs).eval()


def nano_gpt(**kwargs):
    return zoo.create_model("slim_gpt_nano", context_length=32, **kwargs).eval()


@pytest.mark.parametrize(
    "arch, heads, hidden",
    [
        ("slim_vit_tiny", [1, 2, 2, 3], [192, 384, 576, 768]),
        ("slim_vit_small", [2, 3, 5, 6], [384, 768, 1152, 1536]),
    ],
)
def test_heads_round_half_up_and_mlp_units_to_eights(arch, heads, hidden):
    with torch.device("meta"):
        model = zoo.create_model(arch, img_size=32)
    for width, n_heads, n_hidden in zip((0.25, 0.5, 0.75, 1.0), heads, hidden):
        model.set_member(width=width)
        block = model.blocks[0]
        assert (block.attn.num_heads, block.mlp.fc1.active_out) == (n_heads, n_hidden)
    model.set_member(width=0.1)  # LayerNorm families accept widths outside the grid
    assert model.blocks[-1].attn.num_heads == 1


def test_narrow_qkv_keeps_the_first_heads_of_q_k_and_v():
    model = small_vit()
    small = zoo.slice(model, width=0.5)  # 2 of 3 heads, head_dim 64
    full_attn, small_attn = model.blocks[3].attn, small.blocks[3].attn
    q, k, v = full_attn.qkv.weight.split(192)
    expected = torch.cat([q[:128], k[:128], v[:128]])
    assert torch.equal(small_attn.qkv.weight, expected)
    assert torch.equal(small_attn.qkv.bias, torch.cat([b[:128] for b in full_attn.qkv.bias.split(192)]))
    assert torch.equal(small_attn.proj.weight, full_attn.proj.weight[:, :128])
    assert small_attn.num_heads == 2 and small_attn.qkv.weight.shape == (384, 192)


@pytest.mark.parametrize(
    "build, low_rank, members",
    [
        (small_vit, False, [(0.25, None), (0.5, None), (0.75, None)]),
        (small_vit, True, [(0.5, 0.25), (1.0, 0.5), (0.75, 0.25)]),
        (nano_gpt, False, [(0.25, None), (0.75, None)]),
        (nano_gpt, True, [(0.25, 0.5), (0.5, 0.25)]),
    ],
    ids=["vit", "vit-low-rank", "gpt", "gpt-low-rank"],
)
def test_sliced_member_equals_elastic_subnet(build, low_rank, members):
    torch.manual_seed(0)
    model = build(low_rank=low_rank)
    x = model.example_input(2, 16)
    for width, rank in members:
        small = zoo.slice(model, width=width, rank=rank).eval()
        model.set_member(width=width, rank=rank)
        with torch.no_grad():
            diff = (small(x) - model(x)).abs().max().item()
        assert diff <= 1e-5, (width, rank, diff)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = nano_gpt()
    tokens = model.example_input(2, 32)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6, rtol=0)
    assert (before[:, 10:] - after[:, 10:]).abs().amax(dim=-1).min() > 1e-4  # every later step sees it


def test_gpt_takes_any_length_up_to_its_context():
    model = nano_gpt()
    tokens = model.example_input(2, 32)
    with torch.no_grad():
        full = model(tokens)
        for length in (1, 7, 31):
            logits = model(tokens[:, :length])
            assert logits.shape == (2, length, 256)
            torch.testing.assert_close(logits, full[:, :length], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exceeds context_length 32"):
        model(model.example_input(1, 33))
    with pytest.raises(ValueError, match="integer byte ids"):
        model(torch.randn(1, 8))


@pytest.mark.parametrize(
    "arch, timm_arch, count",
    [("slim_vit_tiny", "vit_tiny_patch16_224", 5_717_416), ("slim_vit_small", "vit_small_patch16_224", 22_050_664)],
)
def test_vit_parameter_counts_equal_timm(arch, timm_arch, count):
    with torch.device("meta"):
        ours, theirs = zoo.create_model(arch), timm.create_model(timm_arch)
    assert ours.patch_size == 16
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == count


def test_gpt_at_half_width_overfits_a_fixed_batch_and_leaves_other_heads_untouched():
    torch.manual_seed(0)
    model = nano_gpt().train()
    model.set_member(width=0.5)  # 2 of 4 heads (head_dim 32), 256 of 512 MLP units
    data = torch.tensor(list(TEXT[: 4 * 33]), dtype=torch.int64).view(4, 33)
    inputs, targets = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        if step == 0:
            attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
            qkv_grad = attn.qkv.weight.grad.view(3, 128, 128)
            assert qkv_grad[:, 64:].abs().max() == 0  # heads 3 and 4 of q, k and v get no gradient
            assert qkv_grad[:, :64].abs().amax(dim=(1, 2)).min() > 0  # q, k and v each learn
            assert attn.proj.weight.grad[:, 64:].abs().max() == 0
            assert mlp.fc1.weight.grad[256:].abs().max() == 0 and mlp.fc2.weight.grad[:, 256:].abs().max() == 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at initialisation
    assert losses[-1] < 0.5 * losses[0], losses
