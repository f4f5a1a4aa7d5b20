"""zoo.from_transformers: random-weight transformers causal LMs (Llama, Qwen2, Mistral, GPT-2) built
from small configs become zoo families whose full member's logits equal transformers' own, with
whole key/value groups reordered, narrower members that slice exactly, files that load back, and
one-line refusals of what does not convert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the lm extra (part of dev)

import zoo  # noqa: E402
from zoo import UnsupportedModel  # noqa: E402
from zoo.tokenizer import load_tokenizer, write_tokenizer_files  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB, CONTEXT = 96, 32
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomised(cls, config) -> torch.nn.Module:
    """``cls(config)`` with every tensor off its initialisation (norm scales near 1, biases nonzero:
    all of them matter), the same whichever tests ran before."""
    torch.manual_seed(0)
    model = cls(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_scale = p.dim() == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name)
            p.copy_(1 + 0.2 * noise if is_scale else p + 0.1 * noise)
    return model.eval()


def llama(**overrides):
    return _randomised(transformers.LlamaForCausalLM, transformers.LlamaConfig(**{**SMALL, **overrides}))


def qwen2(**overrides):  # q/k/v biases, no o bias; tied embeddings
    config = transformers.Qwen2Config(**{**SMALL, "tie_word_embeddings": True, **overrides})
    return _randomised(transformers.Qwen2ForCausalLM, config)


def llama_biased(**overrides):  # attention_bias: q, k, v and o; mlp_bias: gate, up, down
    return llama(attention_bias=True, mlp_bias=True, **overrides)


def mistral(**overrides):  # a sliding window as long as the context cannot matter; heads wider than dim / heads
    config = transformers.MistralConfig(**{**SMALL, "sliding_window": CONTEXT, "head_dim": 16, **overrides})
    return _randomised(transformers.MistralForCausalLM, config)


def gpt2(**overrides):
    config = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT, bos_token_id=0, eos_token_id=0)
    return _randomised(transformers.GPT2LMHeadModel, transformers.GPT2Config(**{**config, **overrides}))


BUILDERS = {"llama": llama, "llama_biased": llama_biased, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2}


def tokens(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _difference(hf_model, family, member=None) -> float:
    x = tokens(3, CONTEXT, seed=5)
    family.eval().set_member(member or family.largest)
    return (family(x) - hf_model(input_ids=x).logits).abs().max().item()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("order", ["none", "weight", "activation"])
def test_the_full_member_computes_what_transformers_computes(arch, order):
    model = BUILDERS[arch]()
    calibration = [tokens(2, 16, seed=s) for s in range(3)]
    family = zoo.from_transformers(model, order=order, calibration=calibration)
    assert family.arch == ("slim_gpt2" if arch == "gpt2" else "slim_llama")
    assert _difference(model, family) <= 1e-4
    recorded = family.zoo_metadata["converted_from"]
    assert recorded["order"] == order and recorded["max_abs_diff"] <= 1e-4
    assert family.axes == ("heads", "mlp", "blocks") and len(family.members) == 4


@torch.no_grad()
def test_reordering_moves_whole_key_value_groups_with_their_query_heads():
    model = llama()
    head_dim, per_group = 8, 2  # 4 query heads in 2 key/value groups
    weak = model.model.layers[0].self_attn  # block 0's first group written and read weakly: it must go last
    for proj in (weak.q_proj, weak.k_proj, weak.v_proj):
        proj.weight[: proj.weight.shape[0] // 2] *= 0.1
    weak.o_proj.weight[:, : per_group * head_dim] *= 0.1
    family = zoo.from_transformers(model, order="weight")
    assert _difference(model, family) <= 1e-4
    moved = 0
    for i, layer in enumerate(model.model.layers):
        attn, ours = layer.self_attn, family.blocks[i].attn
        theirs_k = attn.k_proj.weight.split(head_dim)
        theirs_q = attn.q_proj.weight.split(per_group * head_dim)
        theirs_o = attn.o_proj.weight.split(per_group * head_dim, dim=1)
        for g, k_rows in enumerate(ours.k_proj.weight.split(head_dim)):
            source = [j for j, rows in enumerate(theirs_k) if torch.equal(rows, k_rows)]
            assert len(source) == 1, "a key head's rows are not one whole head of the original"
            j = source[0]
            assert torch.equal(ours.q_proj.weight.split(per_group * head_dim)[g], theirs_q[j])
            assert torch.equal(ours.v_proj.weight.split(head_dim)[g], attn.v_proj.weight.split(head_dim)[j])
            assert torch.equal(ours.o_proj.weight.split(per_group * head_dim, dim=1)[g], theirs_o[j])
            moved += g != j
        mlp_rows = {tuple(r.tolist()) for r in layer.mlp.up_proj.weight}
        assert {tuple(r.tolist()) for r in family.blocks[i].mlp.up_proj.weight} == mlp_rows
    assert moved >= 2, "the weak group of block 0 was not moved behind the other one"


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@torch.no_grad()
def test_a_narrower_member_runs_and_slices_to_what_the_family_computes(arch):
    model = BUILDERS[arch]()
    family = zoo.from_transformers(model, order="weight").eval()
    x = tokens()
    member = family.resolve_member(heads=0.5, mlp=0.5)
    family.set_member(member)
    attn = family.blocks[0].attn
    assert (attn.num_heads, family.blocks[0].mlp.up_proj.active_out) == (2, 24 if arch == "qwen2" else 64)
    expected = family(x)
    assert (expected - model(input_ids=x).logits).abs().max().item() > 1e-3  # a different model
    small = zoo.slice(family, member).eval()
    assert small.members == [member] and sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in family.parameters()
    )
    assert (small(x) - expected).abs().max().item() <= 1e-5
    shallow = family.resolve_member(blocks=[1])
    family.set_member(shallow)
    assert (zoo.slice(family, shallow).eval()(x) - family(x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_low_rank_family_is_exact_at_full_rank_and_slices_lower_ranks():
    model = mistral()
    family = zoo.from_transformers(model, order="weight", low_rank=True, ranks=[0.5, 1.0])
    assert family.axes == ("heads", "mlp", "rank", "blocks")
    assert _difference(model, family) <= 1e-4
    x = tokens()
    member = family.resolve_member(width=0.5, rank=0.5)
    family.set_member(member)
    expected = family(x)
    assert (zoo.slice(family, member).eval()(x) - expected).abs().max().item() <= 1e-5


def _tokenizer_json(folder: Path) -> list[str]:
    """A word-level tokenizer.json over a small vocabulary (what a model folder ships)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the quick brown fox jumps over lazy dog a of".split()
    tokenizer = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return ["the quick brown fox jumps over the lazy dog", "a dog of the fox", "over and over"]


@torch.no_grad()
def test_a_folder_converts_with_text_calibration_and_the_family_file_loads_back(tmp_path):
    from typer.testing import CliRunner

    import cli.commands  # noqa: F401  (registers the commands)
    from cli.app import app

    model = llama(tie_word_embeddings=True)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    texts = _tokenizer_json(folder)
    family = zoo.from_transformers(folder, order="activation", calibration=texts)
    assert _difference(model, family) <= 1e-4
    source = family.zoo_metadata["converted_from"]
    assert source["transformers"] == "LlamaForCausalLM" and source["calibration_batches"] == 3
    assert family.model_args["tie_embeddings"] is True and "lm_head.weight" not in family.state_dict()
    recorded = family.zoo_metadata["tokenizer"]
    assert recorded == {"tokenizer.json": (folder / "tokenizer.json").read_text()}
    assert load_tokenizer(family.zoo_metadata).encode(texts[0]).ids[:3] == [1, 2, 3]

    x = tokens()
    family.eval().set_member(width=0.5)
    expected = family(x)
    path = zoo.save(family, tmp_path / "family.safetensors")  # its metadata (and tokenizer) by default
    loaded = zoo.load(path).eval()
    loaded.set_member(width=0.5)
    assert torch.equal(loaded(x), expected) and loaded.zoo_metadata == family.zoo_metadata
    zoo.save_pretrained(family, tmp_path / "family")
    again = zoo.load(tmp_path / "family").eval()
    again.set_member(width=0.5)
    assert torch.equal(again(x), expected)
    member = zoo.slice(family, width=0.5)
    sliced = zoo.load(zoo.save(member, tmp_path / "member.safetensors", metadata=member.zoo_metadata))
    written = write_tokenizer_files(sliced.zoo_metadata, tmp_path / "out")
    assert [p.read_text() for p in written] == [recorded["tokenizer.json"]]  # the tokenizer travels with a member
    info = CliRunner().invoke(app, ["info", str(path)])
    assert info.exit_code == 0 and "slim_llama" in info.output, info.output
    assert "2 blocks with heads, mlp, blocks per block" in info.output  # the converted model's layers
    assert "from transformers " in info.output and "timm" not in info.output  # where it came from


def _refusal(source, match: str, **kwargs) -> str:
    with pytest.raises((ValueError, FileNotFoundError), match=match) as caught:
        zoo.from_transformers(source, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_unsupported_models_are_refused_in_one_line_naming_the_part(tmp_path):
    _refusal(llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope scaling")
    _refusal(mistral(sliding_window=8), "sliding window of 8 tokens")
    _refusal(gpt2(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx")
    neox = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    )
    message = _refusal(neox, "GPTNeoXForCausalLM architecture is not supported")
    assert "LlamaForCausalLM" in message and "GPT2LMHeadModel" in message
    with pytest.raises(UnsupportedModel):
        zoo.from_transformers(neox)


def test_bad_folders_are_refused_in_one_line(tmp_path):
    _refusal(tmp_path / "absent", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refusal(empty, "has no config.json")
    (empty / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    _refusal(empty, "MixtralForCausalLM architecture is not supported")
    folder = tmp_path / "hf"
    gpt2().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    _refusal(
        folder, r"do not match its config.json: transformer.h.0.mlp.c_fc.bias has shape \(128,\), .* asks for \(64,\)"
    )
    _refusal(llama(), "order must be one of", order="magnitude")
    _refusal(llama(), "needs calibration", order="activation")
    _refusal(llama(), "calibration tokens must lie in", calibration=[torch.tensor([[VOCAB]])])
    _refusal(llama(), "texts need the model folder's tokenizer.json", calibration=["no tokenizer for this"])
    without_tokenizer = tmp_path / "llama"
    llama().save_pretrained(without_tokenizer)
    _refusal(without_tokenizer, "tokenizer.json", order="activation", calibration=["text"])
    (without_tokenizer / "tokenizer.json").write_text("{not json")
    _refusal(without_tokenizer, "tokenizer.json is not a readable tokenizer", calibration=["text"])


def test_without_the_extra_the_conversion_says_how_to_install_it(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    llama().save_pretrained(folder)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    _refusal(folder, r"pip install 'zoo\[lm\]'")


def test_importing_zoo_does_not_import_transformers():
    code = "import sys, zoo; assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@torch.no_grad()
def test_zoo_convert_takes_a_transformers_folder(tmp_path):
    from typer.testing import CliRunner

    import cli.commands  # noqa: F401  (registers the commands)
    from cli.app import app

    model = gpt2()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(_tokenizer_json(folder)) * 50)
    out = tmp_path / "family.safetensors"
    args = ["convert", str(folder), "--calibrate", f"text:{text}", "--width", "0.5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "into slim_gpt2" in result.output and "order: activation on 2 pieces" in result.output
    family = zoo.load(out)
    assert [s.to_dict() for s in family.members] == [{"width": 0.5}, {"width": 1.0}]
    assert _difference(model, family) <= 1e-4

    bad = CliRunner().invoke(app, ["convert", str(folder), "--calibrate", "digits", "--out", str(tmp_path / "b.st")])
    assert bad.exit_code == 1 and "takes text:PATH" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "b.st").exists()


@torch.no_grad()
def test_a_bfloat16_model_converts_to_float32_and_is_left_as_it_was(tmp_path):
    qwen2().save_pretrained(tmp_path)  # loaded as transformers loads bfloat16 (rotary frequencies kept in float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    family = zoo.from_transformers(model, order="weight")
    assert next(model.parameters()).dtype == torch.bfloat16 and next(family.parameters()).dtype == torch.float32
    assert _difference(model.float(), family) <= 1e-4
