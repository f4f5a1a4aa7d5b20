"""Token generation: zoo's onnxruntime export against transformers' ``generate``, same member.

A Llama-layout model of realistic proportions (by default width 512, 8 layers, 8 query heads in
2 key/value groups of head size 64, MLP 1408, a 32000-token vocabulary: about 55 M parameters)
is built by transformers with random weights (speed does not depend on them), converted to a
zoo family, and one member (``--width``, default the full one) is written both ways:
``zoo.save_transformers`` (a transformers folder, loaded by ``AutoModelForCausalLM``) and
``export_member`` (ONNX with a key/value cache, verified against PyTorch). The same prompt of
random token ids is continued greedily by the same number of new tokens with
``model.generate(do_sample=False)`` (transformers' own cache) and ``Predictor.generate_ids``,
both checked to give the same tokens, then timed interleaved, run by run, at 1 and 2 threads
(``torch.set_num_threads`` and onnxruntime's intra-op threads).

    python benchmarks/bench_lm_generate.py [--width 1.0] [--new-tokens 64] [--repeats 3]

Prints a table with the ratios and writes it to benchmarks/results/lm/generate.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import transformers
from machine import describe  # benchmarks/machine.py: the CPU for the results file

import zoo
from export.onnx_export import export_member
from export.runtime import Predictor
from zoo.fileio import atomic_path

RESULTS = Path(__file__).parent / "results" / "lm" / "generate.md"


def build_llama(args) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def both_ways(args, workdir: Path) -> tuple[torch.nn.Module, Path, dict]:
    """The member as a loaded transformers model and as a verified ONNX file, and what was built."""
    source = build_llama(args)
    family = zoo.from_transformers(source, order="none", widths=sorted({args.width, 1.0}))
    path = zoo.save(family, workdir / "family.safetensors", metadata=family.zoo_metadata)
    sliced = zoo.WeightsSource.open(path).member(args.width)
    folder = zoo.save_transformers(sliced.model, workdir / "hf", sliced.metadata)
    exported = export_member(sliced, workdir / "member.onnx")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder.path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of new tokens, as zoo generates
    hf.generation_config.pad_token_id = 0
    built = {
        "parameters": sum(p.numel() for p in sliced.model.parameters()),
        "member": str(sliced.member),
        "max_abs_diff": exported.max_abs_diff,
        "export_seconds": exported.export_seconds,
    }
    return hf, exported.path, built


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(hf, onnx_path: Path, prompt: list[int], args, threads: int) -> dict[str, float]:
    """Median seconds per generation of each runtime at ``threads`` (after a checked warm-up)."""
    torch.set_num_threads(threads)
    predictor = Predictor(onnx_path, threads=threads)
    ids = torch.tensor([prompt])

    def transformers_generate() -> list[int]:
        out = hf.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        return out[0, len(prompt) :].tolist()

    def zoo_generate() -> list[int]:
        return predictor.generate_ids(prompt, args.new_tokens)

    runs = {"transformers": transformers_generate, "zoo": zoo_generate}
    tokens = {name: run() for name, run in runs.items()}  # warm-up
    if tokens["zoo"] != tokens["transformers"] or len(tokens["zoo"]) != args.new_tokens:
        raise SystemExit(f"at {threads} threads the runtimes generated different tokens: {tokens}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(seconds(run))
    return {name: statistics.median(t) for name, t in times.items()}


def report(args, built: dict, medians: dict[int, dict[str, float]], load_before: float, started: float) -> str:
    rows = []
    for threads, median in medians.items():
        rate = {name: args.new_tokens / s for name, s in median.items()}
        rows.append(
            f"| {threads} | {rate['transformers']:.1f} | {rate['zoo']:.1f} | "
            f"{rate['zoo'] / rate['transformers']:.2f}x |"
        )
    shape = (
        f"width {args.hidden}, {args.layers} layers, {args.heads} query heads in {args.kv_heads} key/value groups "
        f"(head size {args.hidden // args.heads}), MLP {args.intermediate}, vocabulary {args.vocab}, "
        f"context {args.context}"
    )
    notes = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/bench_lm_generate.py --width {args.width} "
        f"--new-tokens {args.new_tokens} --prompt-tokens {args.prompt_tokens} --repeats {args.repeats}` "
        f"in {time.time() - started:.0f} s.",
        f"Machine: {describe()}, 1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after "
        f"(other processes share these cores). torch {torch.__version__}, transformers {transformers.__version__}, "
        f"onnxruntime {ort.__version__}.",
        f"Model: a LlamaForCausalLM with random weights (speed does not depend on them), {shape}; member "
        f"{built['member']} ({built['parameters'] / 1e6:.1f} M parameters), written as a transformers folder by "
        f"`zoo.save_transformers` and exported by zoo (verified: max |onnxruntime - PyTorch| "
        f"{built['max_abs_diff']:.1e}; {built['export_seconds']:.0f} s to export).",
        f"Task: a prompt of {args.prompt_tokens} random token ids continued greedily by {args.new_tokens} tokens: "
        "transformers' `model.generate(do_sample=False)` (its key/value cache, float32) against zoo's "
        "`Predictor.generate_ids` (onnxruntime, the export's key/value cache); both gave the same tokens at every "
        f"thread count. Median of {args.repeats} interleaved generations per runtime; tokens/s counts the new "
        "tokens (the prompt's prefill included in the time).",
    ]
    header = [
        "| threads | transformers tokens/s | zoo onnxruntime tokens/s | zoo / transformers |",
        "|---|---|---|---|",
    ]
    return "\n".join(["# Token generation: zoo's ONNX export against transformers", "", *notes, "", *header, *rows, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="the member (uniform width) to compare")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved generations per runtime (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.prompt_tokens + args.new_tokens > args.context:
        parser.error("the prompt and the new tokens must fit in the context")

    load_before, started = os.getloadavg()[0], time.time()
    torch.set_num_threads(max(args.threads))
    with tempfile.TemporaryDirectory(prefix="bench-lm-generate-") as workdir:
        hf, onnx_path, built = both_ways(args, Path(workdir))
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, args.vocab, (args.prompt_tokens,), generator=generator).tolist()
        medians = {threads: measure(hf, onnx_path, prompt, args, threads) for threads in args.threads}
    text = report(args, built, medians, load_before, started)
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
