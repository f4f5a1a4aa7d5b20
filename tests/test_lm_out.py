"""A converted language-model family out again: a member sliced to a transformers folder that
transformers loads and that generates what zoo's member generates; a member exported to ONNX with
a key/value cache, verified, generating what PyTorch generates, decoded by `zoo run --prompt` with
the tokenizer the file records; one-line refusals that write nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")  # the lm extra (part of dev)
tokenizers = pytest.importorskip("tokenizers")

import cli.commands  # noqa: E402,F401  (registers the commands)
import zoo  # noqa: E402
from cli.app import app  # noqa: E402

VOCAB, CONTEXT, NEW = 96, 48, 32
WORDS = [f"w{i}" for i in range(VOCAB)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor off its initialisation (norm scales near 1, biases nonzero), the same in every run."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_scale = p.dim() == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name)
            p.copy_(1 + 0.2 * noise if is_scale else p + 0.3 * noise)
    return model.eval()


def llama() -> torch.nn.Module:  # grouped-query attention: 4 query heads in 2 key/value groups
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
    )
    torch.manual_seed(0)
    return _randomised(transformers.LlamaForCausalLM(config))


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT)
    torch.manual_seed(0)
    return _randomised(transformers.GPT2LMHeadModel(config))


def _family_file(tmp_path: Path, build) -> Path:
    """A transformers folder with a word-level tokenizer over the whole vocabulary, converted to a
    family file (the path a downloaded checkpoint takes)."""
    folder = tmp_path / "hf"
    build().save_pretrained(folder)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    words.save(str(folder / "tokenizer.json"))
    family = zoo.from_transformers(folder, order="weight")
    return zoo.save(family, tmp_path / "family.safetensors", metadata=family.zoo_metadata)


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int], count: int) -> list[int]:
    """zoo's member's greedy continuation (its full forward per token, no cache)."""
    ids = list(ids)
    for _ in range(count):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-count:]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama-gqa", "gpt2"])
@torch.no_grad()
def test_a_member_sliced_to_a_folder_loads_in_transformers_and_generates_as_zoo_does(tmp_path, build):
    path = _family_file(tmp_path, build)
    out = tmp_path / "small"
    result = invoke("slice", path, "--width", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}/ (config.json, model.safetensors, tokenizer.json)" in result.output

    config = json.loads((out / "config.json").read_text())
    if build is llama:
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
        assert (config["intermediate_size"], config["num_hidden_layers"]) == (24, 2)
    else:  # GPT-2's heads x head size is its width: the 2 dropped heads are zero heads
        assert config["architectures"] == ["GPT2LMHeadModel"] and (config["n_head"], config["n_inner"]) == (4, 64)
        assert "dropped heads are written as zeros" in result.output
    assert (out / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    member = zoo.slice(zoo.load(path), width=0.5).eval()
    prompt = [3, 14, 15, 9, 2]
    generated = loaded.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    expected = greedy(member, prompt, NEW)
    assert generated[0, len(prompt) :].tolist() == expected
    assert len(set(expected)) > 3  # a real continuation, not one token repeated


def test_members_the_config_cannot_express_are_refused_for_a_folder_but_slice_to_zoo_format(tmp_path):
    path = _family_file(tmp_path, llama)
    uneven = '{"heads": [0.5, 1.0], "mlp": [1.0, 0.5]}'
    refused = invoke("slice", path, "--member", uneven, "--out", tmp_path / "uneven")
    one_line_error(refused, "its blocks differ", "slice it to zoo's format (--out FILE.safetensors)")
    assert not (tmp_path / "uneven").exists() and not list(tmp_path.glob(".uneven*"))
    kept = invoke("slice", path, "--member", uneven, "--out", tmp_path / "uneven.safetensors")
    assert kept.exit_code == 0, kept.output
    assert zoo.load(tmp_path / "uneven.safetensors").blocks[0].attn.num_kv_heads == 1

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line_error(invoke("slice", path, "--width", "0.5", "--out", busy), "is not empty")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    image = zoo.save(zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8), tmp_path / "r.st")
    one_line_error(invoke("slice", image, "--width", "0.5", "--out", tmp_path / "r"), "not a language model")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "build", [llama, pytest.param(gpt2, marks=pytest.mark.slow)], ids=["llama-gqa", "gpt2"]
)  # the dynamo exporter takes about 10 s per model on 2 cores: one in CI
@torch.no_grad()
def test_a_converted_member_exports_with_a_cache_and_zoo_run_decodes_with_its_tokenizer(tmp_path, monkeypatch, build):
    from export.runtime import Predictor

    path = _family_file(tmp_path, build)
    family = zoo.load(path)
    prompt = [3, 14, 15, 9, 2]
    expected = greedy(zoo.slice(family, width=0.5).eval(), prompt, NEW)
    stop = next(i for i in range(3, NEW) if expected[i] not in expected[:i])  # the first new token from the 4th on
    family.zoo_metadata["transformers_config"]["eos_token_id"] = expected[stop]  # where zoo run --prompt ends
    zoo.save(family, path, metadata=family.zoo_metadata)
    onnx_path = tmp_path / "small.onnx"
    source = [path, "--width", "0.5"]
    if build is gpt2:  # a sliced member's file exports as the family's member does
        assert invoke("slice", *source, "--out", tmp_path / "member.safetensors").exit_code == 0
        source = [tmp_path / "member.safetensors"]
    result = invoke("export", *source, "--out", onnx_path)
    assert result.exit_code == 0, result.output
    assert "verification: max |onnxruntime - PyTorch|" in result.output and "for 2 blocks" in result.output
    assert "per 48-token sequence" in result.output

    info = invoke("info", onnx_path)
    assert info.exit_code == 0 and "tokenizer    recorded" in info.output, info.output
    predictor = Predictor(onnx_path, threads=1)
    assert predictor.has_cache and predictor.has_tokenizer
    assert predictor.metadata["input"]["eos_token_ids"] == [expected[stop]]
    assert predictor.generate_ids(prompt, NEW) == expected  # cached decoding, positions after the past
    assert predictor.generate_ids(prompt, NEW, use_cache=False) == expected
    assert predictor.generate_ids(prompt, NEW, stop_at_eos=True) == expected[: stop + 1]

    text = " ".join(WORDS[i] for i in prompt)
    ran = invoke("run", onnx_path, "--prompt", text, "--max-tokens", 2)
    assert ran.exit_code == 0, ran.output
    assert ran.output == text + " " + " ".join(WORDS[i] for i in expected[:2]) + "\n"
    ran = invoke("run", onnx_path, "--prompt", text, "--max-tokens", NEW)  # ends after the end-of-sequence token
    assert ran.output == text + " " + " ".join(WORDS[i] for i in expected[: stop + 1]) + "\n"

    long_prompt = " ".join(["w1"] * (CONTEXT + 1))
    one_line_error(
        invoke("run", onnx_path, "--prompt", long_prompt), "49 tokens, longer than the model's context of 48"
    )
    one_line_error(invoke("run", onnx_path, "--prompt", text, "--max-tokens", 44), "ask for at most 43 new tokens")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers raises ImportError
    one_line_error(invoke("run", onnx_path, "--prompt", text), "pip install 'zoo[lm]'")


def test_bad_export_requests_are_one_line_and_write_nothing(tmp_path):
    path = _family_file(tmp_path, gpt2)
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    one_line_error(invoke("export", path, "--width", "0.5", "--out", folder), "is a folder")
    one_line_error(invoke("export", path, "--member", '{"blocks": [5]}', "--out", tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists() and [p.name for p in tmp_path.glob("*.onnx")] == ["folder.onnx"]


@pytest.mark.parametrize("arch", ["slim_llama", "slim_gpt2"])
@torch.no_grad()
def test_a_family_built_in_zoo_writes_the_config_of_its_layout(tmp_path, arch):
    torch.manual_seed(0)
    family = _randomised(zoo.create_model(arch, num_layers=2, context_length=CONTEXT))
    member = zoo.slice(family, heads=0.5, mlp=0.5, blocks=[1]).eval()
    written = zoo.save_transformers(member, tmp_path / "out")
    assert written.architecture == ("LlamaForCausalLM" if arch == "slim_llama" else "GPT2LMHeadModel")
    assert written.tokenizer_files == [] and (arch == "slim_gpt2") == (written.note is not None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 256, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    assert (loaded(tokens).logits - member(tokens)).abs().max().item() <= 1e-4


@torch.no_grad()
def test_a_low_rank_member_is_written_with_dense_weights(tmp_path):
    family = zoo.from_transformers(llama(), order="weight", low_rank=True, ranks=[0.5, 1.0])
    member = zoo.slice(family, width=0.5, rank=0.5).eval()
    zoo.save_transformers(member, tmp_path / "out", family.zoo_metadata)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    assert (loaded(tokens).logits - member(tokens)).abs().max().item() <= 1e-4
