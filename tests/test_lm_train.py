"""A converted language-model family trains and evaluates on text through its own tokenizer: a
token cache built once per text and tokenizer (atomically), `zoo train FAMILY` through the one
trainer, the output carrying the tokenizer on, and bits per byte that compare with byte models."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # the lm extra (part of dev)
tokenizers = pytest.importorskip("tokenizers")

import zoo  # noqa: E402
from training import text_cache  # noqa: E402
from training.data import TEXT_MAX_VAL_BYTES  # noqa: E402
from training.model_data import data_for  # noqa: E402

WORDS = "def return import class self value café for while print lambda yield None True".split()
SEQ = 16


def _text(path: Path, repeats: int = 120, seed: int = 0) -> Path:
    """Lines of shuffled words (one non-ASCII, so bytes and characters differ)."""
    generator = torch.Generator().manual_seed(seed)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=generator)) for _ in range(repeats)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _bpe(text: Path, vocab: int = 60) -> str:
    """A byte-level BPE trained on ``text``: its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + vocab, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train([str(text)], trainer)
    return tokenizer.to_str()


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    return _text(tmp_path / "corpus.txt")


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict:
    """The tokenizer of ``_text``'s corpus, and `zoo convert`ed families with and without it
    (converted once for the module's tests)."""
    folder = tmp_path_factory.mktemp("families")
    tokenizer = _bpe(_text(folder / "corpus.txt"))
    return {"tokenizer": tokenizer, "family": _family(folder, tokenizer), "bare": _family(folder, None)}


def _cli(*args: str):
    from typer.testing import CliRunner

    import cli.commands  # noqa: F401  (registers the commands)
    from cli.app import app

    return CliRunner().invoke(app, list(args))


def _family(tmp_path: Path, tokenizer: str | None) -> Path:
    """A random-weight Llama folder (with ``tokenizer`` as its tokenizer.json) converted by `zoo convert`."""
    vocab = 320 if tokenizer is None else json.loads(tokenizer)["model"]["vocab"].__len__()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / ("hf" if tokenizer else "hf-bare")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    if tokenizer is not None:
        (folder / "tokenizer.json").write_text(tokenizer)
    out = tmp_path / f"{folder.name}.safetensors"
    result = _cli(
        "convert",
        str(folder),
        "--order",
        "none",
        "--out",
        str(out),
        "--save-dir",
        str(tmp_path / f"{folder.name}-family"),
    )
    assert result.exit_code == 0, result.output
    return out


def test_the_token_cache_is_built_once_per_text_and_tokenizer(corpus, monkeypatch):
    first, other = _bpe(corpus), _bpe(corpus, vocab=30)
    cache = text_cache.cached_tokens(corpus, first)
    records = text_cache.np.fromfile(cache, dtype=text_cache.TOKEN_RECORD)
    text = corpus.read_text(encoding="utf-8")
    assert records["id"].tolist() == tokenizers.Tokenizer.from_str(first).encode(text).ids  # one piece: whole text
    assert int(records["bytes"].sum()) == len(text.encode())  # every byte covered, once
    assert (records["bytes"] > 0).all()

    def no_second_build(*args):
        raise AssertionError("built again")

    with monkeypatch.context() as patch:
        patch.setattr(text_cache, "_build_tokens", no_second_build)
        assert text_cache.cached_tokens(corpus, first) == cache  # reused
    second = text_cache.cached_tokens(corpus, other)
    assert second != cache and cache.exists()  # another tokenizer: another cache, the first kept
    assert sorted(p.suffix for p in cache.parent.iterdir()) == [".tok", ".tok", ".u8"]

    _text(corpus, seed=1)  # the text changes: a new cache, the stale one of this tokenizer removed
    renewed = text_cache.cached_tokens(corpus, first)
    assert renewed != cache and not cache.exists() and second.exists()


def test_a_token_cache_cut_short_leaves_nothing(corpus, monkeypatch):
    tokenizer = _bpe(corpus)
    monkeypatch.setattr(text_cache, "CHUNK", 256)  # many pieces: fail after the first was written
    written = []

    def failing(tok, piece):
        if written:
            raise KeyboardInterrupt
        written.append(piece)
        return records(tok, piece)

    records = text_cache._token_records
    monkeypatch.setattr(text_cache, "_token_records", failing)
    with pytest.raises(KeyboardInterrupt):
        text_cache.cached_tokens(corpus, tokenizer)
    assert [p.suffix for p in text_cache.cache_folder().iterdir()] == [".u8"]  # the byte cache only
    monkeypatch.setattr(text_cache, "_token_records", records)
    pieces = text_cache.np.fromfile(text_cache.cached_tokens(corpus, tokenizer), dtype=text_cache.TOKEN_RECORD)
    assert int(pieces["bytes"].sum()) == corpus.stat().st_size  # built in pieces cut at line ends


def _hand_bits_per_byte(model, tokenizer: str, text: str, seq: int) -> float:
    """Bits per byte of the validation windows, from the whole text's tokens and their offsets."""
    encoding = tokenizers.Tokenizer.from_str(tokenizer).encode(text)
    ids, starts = torch.tensor(encoding.ids), [start for start, _ in encoding.offsets] + [len(text)]
    held = min(len(ids) - seq - 1, max(seq + 1, min(TEXT_MAX_VAL_BYTES, round(len(ids) * 0.1))))
    split, windows = len(ids) - held, (held - seq - 1) // seq + 1
    nats = 0.0
    with torch.no_grad():
        for w in range(windows):
            window = ids[split + w * seq : split + w * seq + seq + 1]
            nats += F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="sum").item()
    covered = text[starts[split + 1] : starts[split + windows * seq + 1]]
    return nats / math.log(2) / len(covered.encode())


def test_zoo_train_takes_a_converted_family_and_eval_reports_bits_per_byte(corpus, tmp_path, families):
    tokenizer, family = families["tokenizer"], families["family"].parent / "hf-family"  # the same family as a folder
    run = tmp_path / "run"
    steps = ["--steps", "8", "--batch-size", "4", "--seq-len", str(SEQ), "--eval-every", "4", "--lr", "0.01"]
    result = _cli(
        "train", str(family), "--data", f"text:{corpus}", "--width", "0.5", "--width", "1.0", *steps, "--out", str(run)
    )
    assert result.exit_code == 0, result.output
    trained, start = zoo.load(run / "model.safetensors"), zoo.load(family)
    assert trained.zoo_metadata["tokenizer"] == {"tokenizer.json": tokenizer}  # carried on
    assert trained.arch == "slim_llama" and trained.context_length == 64  # the family's own context
    changed = [k for k, v in start.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert len(changed) > 10
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for width in (0.5, 1.0):  # validation loss per token falls from step 4 to step 8
        middle, final = (h["loss"] for h in history if h["subnet"] == {"width": width})
        assert math.isfinite(final) and final < middle

    evaluated = _cli("eval", str(run / "model.safetensors"), "--json")  # its recorded data: the text, as tokens
    assert evaluated.exit_code == 0, evaluated.output
    full = next(r for r in json.loads(evaluated.stdout) if r["subnet"] == {"width": 1.0})
    trained.set_member(trained.largest)
    expected = _hand_bits_per_byte(trained.eval(), tokenizer, corpus.read_text(encoding="utf-8"), 64)
    assert full["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert full["loss"] > full["bits_per_byte"] * math.log(2)  # a token covers more than a byte
    table = _cli("eval", str(run / "model.safetensors"))
    assert "bits per byte" in table.output and f"{full['bits_per_byte']:.3f}" in table.output


def test_token_data_matches_its_windows(corpus, families):
    tokenizer = families["tokenizer"]
    model = zoo.load(families["family"])
    bundle = data_for(model, "evaluate", f"text:{corpus}")
    ids = tokenizers.Tokenizer.from_str(tokenizer).encode(corpus.read_text(encoding="utf-8")).ids
    inputs, targets = bundle.train[1]
    assert inputs.tolist() == ids[64:128] and targets.tolist() == ids[65:129]
    assert bundle.num_classes == tokenizers.Tokenizer.from_str(tokenizer).get_vocab_size()


@pytest.mark.parametrize("case", ["no tokenizer", "no text", "stdlib", "no lm extra"])
def test_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path, monkeypatch, families, case):
    family = families["bare" if case == "no tokenizer" else "family"]
    data = {"no text": f"text:{tmp_path / 'missing.txt'}", "stdlib": "stdlib"}.get(case, f"text:{corpus}")
    if case == "no lm extra":
        monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers fails, as without the extra
    run = tmp_path / "run"
    result = _cli("train", str(family), "--data", data, "--steps", "2", "--seq-len", str(SEQ), "--out", str(run))
    expected = {"no tokenizer": "records no tokenizer", "no text": "not found", "stdlib": "give --data text:PATH"}
    expected["no lm extra"] = "pip install 'zoo[lm]'"
    assert result.exit_code != 0 and expected[case] in result.stderr, result.output
    assert result.stderr.count("\n") == 1 and not run.exists()


@pytest.mark.slow
def test_a_family_run_stopped_and_resumed_ends_as_one_never_stopped(corpus, tmp_path, families):
    family = families["family"]
    args = ["train", str(family), "--data", f"text:{corpus}", "--steps", "6", "--batch-size", "4"]
    args += ["--seq-len", str(SEQ), "--strategy", "sandwich", "--member", '{"blocks": [1]}', "--ckpt-every", "1"]
    assert _cli(*args, "--out", str(tmp_path / "whole")).exit_code == 0
    assert _cli(*args, "--stop-after", "3", "--out", str(tmp_path / "parts")).exit_code == 0
    resumed = _cli(*args, "--resume", "--out", str(tmp_path / "parts"))
    assert resumed.exit_code == 0, resumed.output
    whole, parts = (zoo.load(tmp_path / run / "model.safetensors").state_dict() for run in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert zoo.load(tmp_path / "parts" / "model.safetensors").zoo_metadata["tokenizer"]
