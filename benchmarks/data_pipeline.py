"""The data pipeline at scale, measured side by side in one run.

1. Loader throughput: zoo's ``folder:`` pipeline (``load_data`` + the trainer's
   ``TrainLoader``) against timm's own ``create_dataset`` + ``create_loader`` on the same
   generated ImageNet-style folder (``train/<class>/*.jpg``), with the same transforms
   (``RandomResizedCrop`` to ``--img-size``, flip, colour jitter, RandAugment, random erasing),
   batch and worker count. Each side runs once unmeasured (workers start, files enter the page
   cache), then ``--repeats`` epochs in turn (the order rotated every repeat); a run times an
   epoch after its first two batches, which fill the pipeline. Target: zoo / timm >= 0.95.
   A third loader is timm's with
   each item seeded as zoo seeds it, so it makes zoo's very images (zoo reads epoch 0 every
   time): against it only the loaders' own costs differ, not the augmentations drawn. Also the
   CPU time per image, and, in one process, both datasets' cost per item with the same draws.
2. Memory: peak memory of a whole ``zoo train`` (slim_resnet20, 32 px, same steps) on a folder
   of 3,000 training images against one of 300 (both ``train/`` + the same 300-image ``val/``,
   so the final evaluation does the same work; target <= 1.2), and of ``zoo train``
   (slim_gpt_nano) on a 200 MB text corpus against a 10 MB one, cache build included (target
   <= 1.15). Two numbers per run: the training process's peak resident set (``VmHWM``; not
   ``ru_maxrss``, which a child started by ``vfork`` inherits from this process at ``exec``) and
   the peak of the summed proportional set size (PSS: shared pages counted once) of the run's
   process tree (the training process and its loader workers), both sampled every 20 ms.

Images are generated (smooth random colour fields plus noise, saved as JPEG, 200-320 px for the
throughput part); the corpora are the Python standard library's source, repeated.

    python benchmarks/data_pipeline.py            # writes benchmarks/results/data_pipeline.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timm.data import ImageDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402  (benchmarks/machine.py: the CPU for the results file)

from training.bundle import item_seed  # noqa: E402
from training.image_folder import seeded  # noqa: E402

AA = "rand-m9-mstd0.5-inc1"
SAME = "timm, zoo's draws"
REPROB = 0.25
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Generated data


def write_image_folder(root: Path, classes: int, per_class: int, sizes: tuple[int, int], seed: int = 0) -> Path:
    """``classes`` x ``per_class`` JPEGs: a smooth random colour field (8 x 8 upscaled) plus
    noise, so files compress like photographs rather than like pure noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
                (width, height), Image.Resampling.BICUBIC
            )
            pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def write_corpus(path: Path, size: int) -> Path:
    """``size`` bytes of the standard library's source, repeated."""
    from training.data import _stdlib_source

    source = _stdlib_source()
    with open(path, "wb") as out:
        left = size
        while left > 0:
            out.write(source[:left])
            left -= min(left, len(source))
    return path


# ---------------------------------------------------------------------------------------------
# 1. Loader throughput


def loader_throughput(args, root: Path) -> dict:
    import torch
    from timm.data import create_dataset, create_loader

    from training.data import load_data
    from training.image_folder import pillow_safe
    from training.loader import TrainLoader

    torch.set_num_threads(1)
    bundle = load_data(f"folder:{root}", img_size=args.img_size, aa=AA, reprob=REPROB)
    zoo_loader = TrainLoader(bundle, args.batch_size, seed=0, workers=args.workers)
    timm_dataset = create_dataset("", root=str(root), split="train", is_training=True)
    zoo_index = {str(bundle.train.files.path(i)): i for i in range(len(bundle.train))}
    same_draws_dataset = SameDraws(str(root / "train"), zoo_index=zoo_index)

    def timm_loader_of(dataset):
        loader = create_loader(
            dataset, input_size=bundle.input_size, batch_size=args.batch_size, is_training=True, use_prefetcher=False,
            auto_augment=AA, re_prob=REPROB, re_mode="pixel", interpolation="bilinear",
            mean=bundle.mean, std=bundle.std, crop_pct=bundle.crop_pct,
            num_workers=args.workers, persistent_workers=True, device=torch.device("cpu"),
        )  # fmt: skip
        pillow_safe(dataset.transform)  # the same fix of timm's posterize for this Pillow (see pillow_safe)
        return loader

    timm_loader, same_draws_loader = timm_loader_of(timm_dataset), timm_loader_of(same_draws_dataset)
    assert len(timm_dataset) == len(bundle.train), (len(timm_dataset), len(bundle.train))

    def rate(batches, workers: list[int]) -> tuple[float, float]:
        """(images per second, CPU milliseconds per image of the workers and this process) over
        a whole epoch after its first two batches (so no worker is left busy with batches the
        next run would compete with)."""
        iterator = iter(batches)
        for _ in range(2):  # fill the pipeline: every worker has started a batch
            next(iterator)
        started, cpu, images = time.perf_counter(), _cpu_seconds([os.getpid(), *workers]), 0
        for inputs, _ in iterator:
            images += len(inputs)
        return images / (time.perf_counter() - started), 1000 * (_cpu_seconds([os.getpid(), *workers]) - cpu) / images

    # zoo reads epoch 0 every time: its images are then those of the same-draws loader
    runs = {
        "zoo": lambda: zoo_loader.epoch(0),
        "timm": lambda: timm_loader,
        "timm, zoo's draws": lambda: same_draws_loader,
    }
    workers: dict[str, list[int]] = {}
    for name, batches in runs.items():  # unmeasured: workers start, the files enter the page cache
        before = set(_tree(os.getpid()))
        rate(batches(), [])
        workers[name] = sorted(set(_tree(os.getpid())) - before)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # each loader in each position
            speed, cost = rate(runs[name](), workers[name])
            rates[name].append(speed)
            cpu[name].append(cost)
    zoo_loader.close()
    same_draws = _per_item_cpu(bundle, timm_dataset)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "images_per_s": medians, "all": rates, "ratio": medians["zoo"] / medians["timm"],
        "same_draws_ratio": medians["zoo"] / medians["timm, zoo's draws"],
        "cpu_ms_per_image": cpu_medians, "cpu_all": cpu, "cpu_ratio": cpu_medians["timm"] / cpu_medians["zoo"],
        "same_draws_cpu_ratio": cpu_medians["timm, zoo's draws"] / cpu_medians["zoo"],
        "images": len(bundle.train), "shape": list(bundle.input_size), "same_draws": same_draws,
    }  # fmt: skip


class SameDraws(ImageDataset):
    """timm's dataset, each item's transform run under the seed zoo gives that file in epoch 0,
    so its images are exactly zoo's: only the two loaders' own costs differ."""

    def __init__(self, root: str, zoo_index: dict[str, int]):
        super().__init__(root)
        self.zoo_index = [zoo_index[str(path)] for path, _ in self.reader.samples]

    def __getitem__(self, index: int):
        with seeded(item_seed(0, 0, self.zoo_index[index])):
            return super().__getitem__(index)


def _per_item_cpu(bundle, timm_dataset) -> dict:
    """CPU milliseconds per training item in this process, zoo's dataset against timm's with
    the same random draws (timm's item run under zoo's per-item seeding), so the two produce
    identical tensors and only the pipelines' own costs differ."""
    import torch

    where = {str(path): i for i, (path, _) in enumerate(timm_dataset.reader.samples)}
    spent, identical = {"zoo": 0.0, "timm": 0.0}, 0

    def zoo_item(i: int) -> torch.Tensor:
        return bundle.train[i][0]

    def timm_item(i: int) -> torch.Tensor:
        with seeded(item_seed(0, 0, i)):
            return timm_dataset[where[str(bundle.train.files.path(i))]][0]

    for i in range(len(bundle.train)):
        items = {}
        for name, item in (("zoo", zoo_item), ("timm", timm_item))[
            :: 1 if i % 2 else -1
        ]:  # each goes first half the time
            started = time.process_time()
            items[name] = item(i)
            spent[name] += time.process_time() - started
        identical += torch.equal(items["zoo"], items["timm"])
    per_item = {name: 1000 * value / len(bundle.train) for name, value in spent.items()}
    return {
        "cpu_ms_per_item": per_item,
        "identical": identical,
        "items": len(bundle.train),
        "ratio": spent["timm"] / spent["zoo"],
    }


def _cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` (all their threads), from /proc."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# 2. Peak memory of whole runs


def _tree(pid: int) -> list[int]:
    pids, found = [pid], []
    while pids:
        current = pids.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as file:
                    pids += [int(child) for child in file.read().split()]
        except OSError:
            continue  # it ended meanwhile
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            return next(int(line.split()[1]) for line in file if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _hwm_kib(pid: int) -> int:
    """The process's peak resident set so far (``VmHWM``), KiB."""
    try:
        with open(f"/proc/{pid}/status") as file:
            return next((int(line.split()[1]) for line in file if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def peak_memory(command: list[str], env: dict) -> dict:
    """Run ``command``; its peak RSS and the peak summed PSS of its process tree, MiB."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rss, pss = 0, 0
    started = time.perf_counter()
    while process.poll() is None:
        rss = max(rss, _hwm_kib(process.pid))
        pss = max(pss, sum(_pss_kib(p) for p in _tree(process.pid)))
        time.sleep(0.02)
    errors = process.stderr.read()
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed: {errors.strip().splitlines()[-1] if errors.strip() else process.returncode}"
        )
    return {"rss_mib": rss / 1024, "tree_pss_mib": pss / 1024, "wall_s": time.perf_counter() - started}


def train_memory(args, workdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    write_image_folder(workdir / "val300", classes=10, per_class=30, sizes=(48, 96), seed=1)
    for images in (300, 3000):
        root = workdir / f"folder{images}"
        write_image_folder(root / "train", classes=10, per_class=images // 10, sizes=(48, 96), seed=images)
        shutil.copytree(workdir / "val300", root / "val")
        command = [sys.executable, "-m", "cli", "train", "slim_resnet20", "--data", f"folder:{root}",
                   "--img-size", "32", "--width", "0.5", "--steps", str(args.train_steps), "--batch-size", "32",
                   "--workers", str(args.workers), "--eval-every", str(args.train_steps), "--aa", AA,
                   "--out", str(workdir / f"run-folder{images}")]  # fmt: skip
        runs[f"folder of {images} training images"] = peak_memory(command, env)
    for megabytes in (10, 200):
        corpus = write_corpus(workdir / f"corpus{megabytes}.txt", megabytes * 10**6)
        cache = workdir / f"cache{megabytes}"
        command = [sys.executable, "-m", "cli", "train", "slim_gpt_nano", "--data", f"text:{corpus}",
                   "--strategy", "separate", "--width", "0.5", "--steps", str(args.train_steps), "--batch-size", "16",
                   "--eval-every", str(args.train_steps), "--out", str(workdir / f"run-text{megabytes}")]  # fmt: skip
        runs[f"text {megabytes} MB"] = peak_memory(command, {**env, "ZOO_CACHE_DIR": str(cache)})
        corpus.unlink()
        shutil.rmtree(cache)
    ratios = {
        "folder": {
            k: runs["folder of 3000 training images"][k] / runs["folder of 300 training images"][k]
            for k in ("rss_mib", "tree_pss_mib")
        },
        "text": {k: runs["text 200 MB"][k] / runs["text 10 MB"][k] for k in ("rss_mib", "tree_pss_mib")},
    }
    return {"runs": runs, "ratios": ratios}


# ---------------------------------------------------------------------------------------------


def record_run(throughput: dict) -> list[dict]:
    """Append this run's throughput ratios to ``data_pipeline_runs.jsonl`` (every run, never
    only the best) and return every recorded run: the verdict is on their median."""
    runs = RESULTS / "data_pipeline_runs.jsonl"
    keys = ("ratio", "cpu_ratio", "same_draws_ratio", "same_draws_cpu_ratio")
    entry = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average": round(os.getloadavg()[0], 1)}
    with runs.open("a") as file:
        file.write(json.dumps({**entry, **{k: round(throughput[k], 4) for k in keys}}) + "\n")
    return [json.loads(line) for line in runs.read_text().splitlines()]


def report(args, throughput: dict, memory: dict, history: list[dict]) -> str:
    ok = lambda good: "ok" if good else "MISS"  # noqa: E731
    speed, same = throughput["images_per_s"], throughput["same_draws"]
    median = statistics.median(run["ratio"] for run in history)
    lines = [
        "# Data pipeline",
        "",
        f"`python benchmarks/data_pipeline.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"{describe()}, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"## Loader throughput ({throughput['images']} JPEGs of 200-320 px "
        f"-> {'x'.join(map(str, throughput['shape']))}, "
        f"RandAugment {AA}, random erasing {REPROB}, batch {args.batch_size}, {args.workers} workers)",
        "",
        "| loader | images/s (median of %d) | runs |" % args.repeats,
        "|---|---|---|",
        f"| zoo folder: (load_data + TrainLoader) | {speed['zoo']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in throughput['all']['zoo'])} |",
        f"| timm create_dataset + create_loader | {speed['timm']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in throughput['all']['timm'])} |",
        f"| timm, each item seeded as zoo seeds it (zoo's images) | {speed[SAME]:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in throughput['all'][SAME])} |",
        "",
        f"zoo / timm: **{throughput['ratio']:.3f}** in this run; over the {len(history)} recorded runs "
        f"(data_pipeline_runs.jsonl) {min(r['ratio'] for r in history):.3f}-{max(r['ratio'] for r in history):.3f}, "
        f"median **{median:.3f}** {ok(median >= 0.95)} (target >= 0.95); "
        f"zoo / timm with zoo's images: **{throughput['same_draws_ratio']:.3f}**",
        "",
        "CPU time per image (loader workers plus the consuming process, median): "
        f"zoo {throughput['cpu_ms_per_image']['zoo']:.2f} ms, "
        f"timm {throughput['cpu_ms_per_image']['timm']:.2f} ms, "
        f"timm with zoo's images {throughput['cpu_ms_per_image'][SAME]:.2f} ms; "
        f"timm / zoo **{throughput['cpu_ratio']:.3f}**, with zoo's images **{throughput['same_draws_cpu_ratio']:.3f}** "
        "(the throughput a saturated machine would give, less sensitive to other load than wall time)",
        "",
        f"Same items with the same random draws, one process: zoo {same['cpu_ms_per_item']['zoo']:.2f} ms, timm "
        f"{same['cpu_ms_per_item']['timm']:.2f} ms of CPU per item; timm / zoo **{same['ratio']:.3f}** "
        f"({same['identical']} of {same['items']} tensors identical). "
        "The loaders above draw different augmentations per image (RandAugment's ops differ in cost), "
        "which with the machine's other load is most of their run-to-run spread.",
        "",
        f"## Peak memory of `zoo train` ({args.train_steps} steps each)",
        "",
        "| run | peak RSS, training process (MiB) | peak PSS, process tree (MiB) | wall time (s) |",
        "|---|---|---|---|",
    ]
    for name, run in memory["runs"].items():
        lines.append(f"| {name} | {run['rss_mib']:.0f} | {run['tree_pss_mib']:.0f} | {run['wall_s']:.0f} |")
    folder, text = memory["ratios"]["folder"], memory["ratios"]["text"]
    lines += [
        "",
        f"3,000 / 300 images: RSS **{folder['rss_mib']:.3f}**, tree PSS **{folder['tree_pss_mib']:.3f}** "
        f"{ok(max(folder.values()) <= 1.2)} (target <= 1.2)",
        f"200 MB / 10 MB text: RSS **{text['rss_mib']:.3f}**, tree PSS **{text['tree_pss_mib']:.3f}** "
        f"{ok(max(text.values()) <= 1.15)} (target <= 1.15; the 200 MB run includes building its cache)",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="training images of the throughput folder")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zoo-data-bench-") as tmp:
        workdir = Path(tmp)
        root = workdir / "imagenet-like"
        write_image_folder(root / "train", classes=10, per_class=args.images // 10, sizes=(200, 320))
        write_image_folder(root / "val", classes=10, per_class=5, sizes=(200, 320), seed=1)
        throughput = loader_throughput(args, root)
        print(
            f"loader: zoo {throughput['images_per_s']['zoo']:.1f} images/s, "
            f"timm {throughput['images_per_s']['timm']:.1f}: ratio {throughput['ratio']:.3f}; "
            f"CPU ratio {throughput['cpu_ratio']:.3f}",
            flush=True,
        )
        memory = {
            "runs": {},
            "ratios": {
                "folder": {"rss_mib": float("nan"), "tree_pss_mib": float("nan")},
                "text": {"rss_mib": float("nan"), "tree_pss_mib": float("nan")},
            },
        }
        if not args.skip_memory:
            memory = train_memory(args, workdir)
            print(json.dumps(memory["ratios"]), flush=True)
    history = record_run(throughput) if not args.skip_memory else [throughput]
    text = report(args, throughput, memory, history)
    print(text)
    if not args.skip_memory:
        from zoo.fileio import atomic_path

        with atomic_path(RESULTS / "data_pipeline.md") as tmp:
            tmp.write_text(text)
        with atomic_path(RESULTS / "data_pipeline.json") as tmp:
            tmp.write_text(json.dumps({"throughput": throughput, "memory": memory}, indent=1))


if __name__ == "__main__":
    main()
