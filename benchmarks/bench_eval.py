"""Byte-model evaluation against the FLOP-bound time of its forward passes.

`zoo eval slim_gpt_nano --pretrained` runs every validation window through every member. The
least time that can take on this machine is the forward FLOPs divided by the rate of a dense
matrix product of the model's own shapes (measured here, same thread count): the FLOP bound.
FLOPs are the matrix products that ``zoo.count_flops`` counts plus causal attention
(``QK^T`` and ``AV`` over the ``T(T+1)/2`` query-key pairs of each head actually run).

The ratio is evaluation wall time over that bound, for ``training.evaluate.evaluate`` as it
is (batches of 8192 bytes) and for the loop it replaced (batches of 256 windows, 65536 bytes),
timed alternately on the same windows.

    python benchmarks/bench_eval.py [--windows 256] [--threads 1] [--repeats 2]

Prints a table and writes it to benchmarks/results/eval.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe  # benchmarks/machine.py: the CPU for the results file
from torch.utils.data import DataLoader, Subset

import zoo
from training.evaluate import default_batch_size, evaluate
from training.model_data import data_for
from zoo.models.transformer import Attention

RESULTS = Path(__file__).resolve().parent / "results" / "eval.md"


def attention_flops(model: zoo.ElasticModel, tokens: torch.Tensor) -> int:
    """Causal attention FLOPs of one forward pass (the counter does not see fused attention)."""
    total = 0

    def count(module: Attention, args, output) -> None:
        nonlocal total
        batch, length = args[0].shape[:2]
        total += 2 * 2 * batch * module.num_heads * module.head_dim * length * (length + 1) // 2

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, Attention)]
    try:
        with torch.inference_mode():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def gemm_rate(tokens: int, dim: int, hidden: int, repeats: int = 5) -> float:
    """FLOP/s of the model's largest matrix products (tokens x dim -> hidden and back), best of ``repeats``."""
    x, w1 = torch.randn(tokens, dim), torch.randn(hidden, dim)
    h, w2 = torch.randn(tokens, hidden), torch.randn(dim, hidden)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, w1)
        F.linear(h, w2)
        best = min(best, time.perf_counter() - start)
    return 2 * 2 * tokens * dim * hidden / best


def previous_loop(model, dataset, members, batch_size: int = 256) -> None:
    """What evaluate did before: each batch of 256 windows through every member, no_grad."""
    model.eval()
    with torch.no_grad():
        for inputs, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            for member in members:
                model.set_member(member)
                logits = model(inputs).float().flatten(0, -2)
                F.cross_entropy(logits, targets.flatten(), reduction="sum")


def breakdown(model, tokens: torch.Tensor) -> dict[str, float]:
    """Shares of one forward pass's CPU time: matrix products, fused attention, everything else."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tokens)
    shares = {"matrix products": 0.0, "attention": 0.0, "other (GELU, LayerNorm, copies, adds)": 0.0}
    for event in prof.key_averages():
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            shares["matrix products"] += event.self_cpu_time_total
        elif "scaled_dot_product" in event.key:
            shares["attention"] += event.self_cpu_time_total
        else:
            shares["other (GELU, LayerNorm, copies, adds)"] += event.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=256, help="validation windows of 256 bytes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()[0]
    model = zoo.create_model("slim_gpt_nano", pretrained=True).eval()
    members = [zoo.Member.from_dict(r["subnet"]) for r in model.zoo_metadata["metrics"]]
    val = data_for(model, "evaluate").val
    windows = Subset(val, range(min(args.windows, len(val))))
    tokens = torch.stack([windows[i][0] for i in range(min(8, len(windows)))])

    flops = {}
    for member in members:
        model.set_member(member)
        per_window = zoo.count_flops(model, member) + attention_flops(model, tokens) // len(tokens)
        flops[str(member)] = per_window * len(windows)
    hidden = 4 * model.embed_dim  # the MLP's hidden width (mlp_ratio 4)

    runs = {
        "evaluate": lambda: evaluate(model, windows, members, batch_size=default_batch_size(model)),
        "previous loop": lambda: previous_loop(model, windows, members),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    rates = []
    for _ in range(args.repeats):
        rates.append(gemm_rate(8192, model.embed_dim, hidden))
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rates.append(gemm_rate(8192, model.embed_dim, hidden))
    rate = max(rates)
    bound = sum(flops.values()) / rate
    model.set_member(members[-1])
    batch = torch.stack([windows[i][0] for i in range(min(default_batch_size(model), len(windows)))])
    shares = breakdown(model, batch)

    lines = [
        "# Byte-model evaluation against its FLOP bound",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} "
        f"by `python benchmarks/bench_eval.py --windows {args.windows} "
        f"--threads {args.threads} --repeats {args.repeats}` in {time.time() - started:.0f} s. Machine: {describe()}, "
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after; "
        f"torch {torch.__version__}, "
        f"{args.threads} thread(s).",
        "",
        f"slim_gpt_nano (shipped), {len(windows)} validation windows of 256 bytes, its {len(members)} trained members. "
        f"Dense matrix product rate (best of {len(rates)} measurements between the runs): {rate / 1e9:.1f} GFLOP/s.",
        "",
        "| member | GFLOPs (matmul + causal attention) |",
        "|---|---:|",
        *[f"| {name} | {f / 1e9:.1f} |" for name, f in flops.items()],
        "",
        f"FLOP bound for all members: {bound:.2f} s.",
        "",
        "| loop | median s | / FLOP bound | every run: s (/ FLOP bound) |",
        "|---|---:|---:|---|",
        *[
            f"| {name} | {statistics.median(t):.2f} | {statistics.median(t) / bound:.2f} | "
            + ", ".join(f"{s:.2f} ({s / bound:.2f})" for s in t)
            + " |"
            for name, t in times.items()
        ],
        "",
        f"Where a forward pass of the largest member ({len(batch)} windows) spends its time: "
        + ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
        + ".",
    ]  # what the numbers mean is the author's to write, next to them (README), not fixed text here
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
