"""The stand-in for a downloaded checkpoint: a small Llama-layout model trained from scratch with a
plain PyTorch loop on this Python's standard library (its top-level ``.py`` files), with a BPE
tokenizer trained on the same text by ``tokenizers``, saved as a transformers folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``) -- the path a real checkpoint takes
into ``zoo convert``. No pretrained language model can be downloaded here, so this is it.

    python benchmarks/lm_pretrain.py [--work DIR] [--steps N]

Resumable: a checkpoint (model, optimizer, step, RNG) is written atomically every
``--checkpoint-every`` steps into ``DIR/pretrain_state.pt``; a stopped run restarts from it.
The text is split by files: the last ``HELD_OUT`` fraction (by bytes) is held out, never trained
on (``DIR/held.txt``), and is what ``lm_evidence.py`` scores members on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.fileio import atomic_path  # noqa: E402

WORK = Path(os.environ.get("ZOO_LM_WORK", "/tmp/zoo-lm-evidence"))
HELD_OUT = 0.05
MODEL = dict(  # 6 layers so that depth -2 and -4 both leave a model; width 256 fits 2 shared cores
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
)
VOCAB, SEQ, BATCH, LR, WARMUP = 2048, 128, 16, 2e-3, 100


def write_texts(work: Path) -> tuple[Path, Path]:
    """train.txt and held.txt: the stdlib's top-level .py files in name order, split by files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    total, cut, seen = sum(len(t.encode()) for t in texts), len(texts), 0
    for i, text in enumerate(texts):
        seen += len(text.encode())
        if seen > (1 - HELD_OUT) * total:
            cut = i + 1
            break
    paths = work / "train.txt", work / "held.txt"
    for path, part in zip(paths, (texts[:cut], texts[cut:]), strict=True):
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_text("\n".join(part), encoding="utf-8")
    return paths


def train_tokenizer(train_text: Path, folder: Path):
    """A byte-level BPE of VOCAB tokens trained on the training text, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train([str(train_text)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return tokenizer


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=SEQ * 4, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        **MODEL,
    )  # fmt: skip


def token_tensor(tokenizer, path: Path, cache: Path) -> torch.Tensor:
    if cache.exists():
        return torch.load(cache, weights_only=True)
    ids = torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8")).ids, dtype=torch.int16)
    with atomic_path(cache) as tmp:
        torch.save(ids, tmp)
    return ids


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))


def save_state(path: Path, model, optimizer, step: int) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    state["rng"] = torch.get_rng_state()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def pretrain(work: Path, steps: int, checkpoint_every: int) -> None:
    from transformers import LlamaForCausalLM

    work.mkdir(parents=True, exist_ok=True)
    folder = work / "pretrained"
    train_text, _ = write_texts(work)
    tokenizer = train_tokenizer(train_text, folder)
    ids = token_tensor(tokenizer, train_text, work / "train_tokens.pt").long()
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    state_path, step = work / "pretrain_state.pt", 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    log = open(work / "pretrain_log.jsonl", "a")
    started = time.time()
    while step < steps:
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,))
        batch = torch.stack([ids[s : s + SEQ + 1] for s in starts])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 0:
            log.write(
                json.dumps({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - started)}) + "\n"
            )
            log.flush()
        if step % checkpoint_every == 0 or step == steps:
            save_state(state_path, model, optimizer, step)
    model.save_pretrained(folder)  # safetensors, config.json: a transformers folder
    (work / "pretrain_done.json").write_text(json.dumps({"steps": steps, "seconds": round(time.time() - started)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pretrain(args.work, args.steps, args.checkpoint_every)


if __name__ == "__main__":
    main()
