"""Steps of ``benchmarks/gpu_check.sh`` that need Python: the environment, generated data, and
the exported member run by ``Predictor`` on onnxruntime's CUDA provider.

    python benchmarks/gpu_check.py environment [--require-cuda] --out environment.json
    python benchmarks/gpu_check.py images DIR --classes 10 --per-class 100 --size 256
    python benchmarks/gpu_check.py text FILE --megabytes 8
    python benchmarks/gpu_check.py predictor MEMBER.onnx IMAGES --device cuda --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 peak of the GPUs this check expects, in TFLOP/s (vendor data sheets; SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def environment(require_cuda: bool, out: Path) -> int:
    """Versions, the GPU and its bf16 peak (``peak_bf16_tflops``, null when unknown: MFU is then
    not reported), onnxruntime's providers and the CPU, printed and written to ``out``."""
    import onnxruntime as ort
    import torch
    from machine import cpu

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else None
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": name,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "peak_bf16_tflops": next((v for k, v in PEAK_BF16_TFLOPS.items() if name and k in name), None),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "cpu": cpu(),
    }
    text = json.dumps(info, indent=1)
    print(text)
    out.write_text(text + "\n")
    if require_cuda and not cuda:
        print(
            "error: torch.cuda.is_available() is False: this check needs a CUDA GPU (or --cpu-dry-run)", file=sys.stderr
        )
        return 1
    return 0


def images(folder: Path, classes: int, per_class: int, size: int) -> int:
    """A class-per-folder tree of JPEG files: smooth random colour fields with noise, so that
    decoding and resizing cost what photos cost."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            base = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR), dtype=np.int16)
            pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c:02d}" / f"{i:04d}.jpg", quality=90)
    print(f"{classes * per_class} images of {size} px in {folder}")
    return 0


def text(path: Path, megabytes: float) -> int:
    """A corpus of Python source (this checkout's, repeated) of about ``megabytes``."""
    root = Path(__file__).resolve().parents[1]
    source = b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")) if ".git" not in p.parts)
    target = int(megabytes * 2**20)
    path.write_bytes((source * (target // len(source) + 1))[:target])
    print(f"{target / 2**20:.1f} MB of text in {path}")
    return 0


def predictor(member: Path, image_folder: Path, device: str, out: Path) -> int:
    """The exported member on ``device`` through zoo's runtime: the providers it really uses,
    its top-1 agreement with the CPU provider, and latency at batch 1 and 32."""
    from export.runtime import Predictor

    files = sorted(image_folder.rglob("*.jpg"))[:32]
    on_device, on_cpu = Predictor(member, device=device), Predictor(member, device="cpu")
    batch = on_device.preprocess(files)
    logits, reference = on_device.run(batch), on_cpu.run(batch)
    report = {
        "device": device,
        "providers": on_device.providers,
        "top1_agreement_with_cpu": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        "max_abs_logit_difference_vs_cpu": float(np.abs(logits - reference).max()),
    }
    for size in (1, 32):
        for name, runner in ((device, on_device), ("cpu", on_cpu)):
            runner.run(batch[:size])
            times = []
            for _ in range(20):
                start = time.perf_counter()
                runner.run(batch[:size])
                times.append(time.perf_counter() - start)
            report[f"latency_ms_batch{size}_{name}"] = round(1e3 * statistics.median(times), 3)
    text = json.dumps(report, indent=1)
    print(text)
    out.write_text(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    env = sub.add_parser("environment")
    env.add_argument("--require-cuda", action="store_true")
    env.add_argument("--out", type=Path, required=True)
    img = sub.add_parser("images")
    img.add_argument("folder", type=Path)
    img.add_argument("--classes", type=int, default=10)
    img.add_argument("--per-class", type=int, default=100)
    img.add_argument("--size", type=int, default=256)
    txt = sub.add_parser("text")
    txt.add_argument("path", type=Path)
    txt.add_argument("--megabytes", type=float, default=8)
    pred = sub.add_parser("predictor")
    pred.add_argument("member", type=Path)
    pred.add_argument("images", type=Path)
    pred.add_argument("--device", default="cuda")
    pred.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "environment":
        return environment(args.require_cuda, args.out)
    if args.step == "images":
        return images(args.folder, args.classes, args.per_class, args.size)
    if args.step == "text":
        return text(args.path, args.megabytes)
    return predictor(args.member, args.images, args.device, args.out)


if __name__ == "__main__":
    sys.exit(main())
