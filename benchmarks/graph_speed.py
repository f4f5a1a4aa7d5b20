"""What a graph family's member costs to train, against the same member as a standalone model.

A graph family runs a member other than its largest through ``functional_call`` on
index-selected parts of its tensors (``zoo/models/graph.py``); the standalone model is
``zoo.slice`` of that member (a timm model with fewer channels). One training step each (forward,
cross-entropy, backward, SGD with momentum; the family's step is ``masked_step``, as
``zoo train`` runs it), the two alternated in one series so load changes hit both alike; the
median of each and their ratio are written to ``benchmarks/results/graph_speed.json``.
Goal: the family's step at most 1.3x the standalone one. ``resnet18`` converts to the hand-written
``slim_resnet18``: its row shows what any family's masked step costs over the standalone model's
plain one.

    python benchmarks/graph_speed.py   # resnet10t, efficientnet_b0 (graph), resnet18 (hand-written): 64 px, batch 32
    python benchmarks/graph_speed.py --models convnext_atto --size 96 --batch 16 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import zoo
from training.masking import MaskCache, masked_step

RESULTS = Path(__file__).resolve().parent / "results" / "graph_speed.json"


def _step(model, optimizer, x, y, masks=None) -> tuple[float, float]:
    """Seconds of forward + backward, and of the optimizer step."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    middle = time.perf_counter()
    if masks is None:
        optimizer.step()
    else:
        masked_step(optimizer, masks)
    return middle - start, time.perf_counter() - middle


def measure(name: str, size: int, batch: int, repeats: int, width: float) -> dict:
    torch.manual_seed(0)
    calibration = [torch.randn(batch, 3, size, size)]
    family = zoo.from_timm(name, num_classes=10, img_size=size, widths=[width], calibration=calibration)
    member = family.set_member(width=width)
    standalone = zoo.slice(family, member).train()
    family.train().set_member(member, for_training=True)
    masks = MaskCache(family).union([member])
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (family, standalone)]
    x, y = torch.randn(batch, 3, size, size), torch.randint(10, (batch,))
    times: dict[str, list[float]] = {k: [] for k in ("family", "standalone", "family_fb", "standalone_fb")}
    for i in range(repeats + 2):  # two warm-up rounds
        family_time = _step(family, optimizers[0], x, y, masks)
        standalone_time = _step(standalone, optimizers[1], x, y)
        if i >= 2:
            times["family"].append(sum(family_time))
            times["standalone"].append(sum(standalone_time))
            times["family_fb"].append(family_time[0])
            times["standalone_fb"].append(standalone_time[0])
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "family": family.arch,
        "member": member.to_dict(),
        "input": [batch, 3, size, size],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "family_step_ms": round(ms["family"], 2),
        "standalone_step_ms": round(ms["standalone"], 2),
        "ratio": round(ms["family"] / ms["standalone"], 3),
        # forward + backward only: what running the member through the family costs; the rest of a
        # family's step is masked_step over the whole family's tensors, which every family pays
        "family_forward_backward_ms": round(ms["family_fb"], 2),
        "standalone_forward_backward_ms": round(ms["standalone_fb"], 2),
        "ratio_forward_backward": round(ms["family_fb"] / ms["standalone_fb"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet10t,efficientnet_b0,resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.size, args.batch, args.repeats, args.width) for m in args.models.split(",")]
    for row in rows:
        print(
            f"{row['model']:<20} family {row['family_step_ms']:8.2f} ms  standalone {row['standalone_step_ms']:8.2f} ms"
            f"  ratio {row['ratio']:.3f} (forward + backward {row['ratio_forward_backward']:.3f})"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
