"""export.runtime and `zoo run`: exported members in real onnxruntime sessions, no torch needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import zoo
from cli import commands  # noqa: F401  (registers the commands)
from cli.app import app
from export import export_file
from export.runtime import Predictor, resize
from zoo import WeightsSource

LABELS = [f"class_{i}" for i in range(10)]
CONTEXT = 16


def exported(family: zoo.ElasticModel, folder, width: float, metadata: dict | None = None):
    """``family`` saved as a weights file, then one member through `zoo export`'s exporter."""
    weights = zoo.save(family, folder / "family.safetensors", metadata=metadata)
    member = WeightsSource.open(weights).member(width)
    return member.model, export_file(weights, folder / "member.onnx", width=width).path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    family = zoo.create_model("slim_resnet20", widths=[0.5, 1.0]).eval()
    return exported(family, tmp_path_factory.mktemp("resnet"), 0.5, {"labels": LABELS})


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    torch.manual_seed(0)
    family = zoo.create_model("slim_gpt_nano", context_length=CONTEXT).eval()
    return exported(family, tmp_path_factory.mktemp("gpt"), 0.5)


def torch_probabilities(member, images_uint8: np.ndarray) -> np.ndarray:
    cfg = member.pretrained_cfg
    x = torch.from_numpy(images_uint8).float().permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        return member(x).softmax(-1).numpy()


def test_runtime_and_zoo_run_work_without_torch_or_zoo(resnet, tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = (
        "import sys; import export.runtime\n"
        "assert 'torch' not in sys.modules and 'zoo' not in sys.modules, 'export.runtime imported torch or zoo'\n"
        f"sys.argv = ['zoo', 'run', {str(resnet[1])!r}, {str(image)!r}, '--top-k', '2']\n"
        "from cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
        "assert 'torch' not in sys.modules, 'zoo run imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and done.stdout.split()[1] in LABELS and done.stdout.count(",") == 1


def test_classify_matches_pytorch_from_png_and_array(resnet, tmp_path):
    member, path = resnet
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    png = tmp_path / "image.png"
    Image.fromarray(images[0]).save(png)
    expected = torch_probabilities(member, images)
    predictor = Predictor(path)
    assert predictor.kind == "image" and predictor.providers[0] == "CPUExecutionProvider"
    assert predictor.metadata["subnet"] == {"width": 0.5} and predictor.labels == LABELS
    np.testing.assert_allclose(predictor.classify(png), expected[:1], atol=1e-5)
    np.testing.assert_allclose(predictor.classify(images), expected, atol=1e-5)
    np.testing.assert_allclose(predictor.classify([images[1], str(png)]), expected[::-1], atol=1e-5)
    np.testing.assert_allclose(predictor.classify(images.astype(np.float32) / 255), expected, atol=1e-5)
    gray = images[0, :, :, 0]
    np.testing.assert_allclose(
        predictor.classify(gray), predictor.classify(np.repeat(gray[:, :, None], 3, 2)), atol=1e-6
    )
    best = predictor.top_k(images, k=3)
    assert [[label for label, _ in row] for row in best] == [[LABELS[i] for i in np.argsort(-p)[:3]] for p in expected]
    assert best[0][0][1] == pytest.approx(expected[0].max(), abs=1e-5)


def test_resize_is_torch_antialiased_bilinear():
    image = np.random.default_rng(1).random((45, 70, 3), dtype=np.float32)
    for size in [(32, 32), (90, 50)]:  # a downscale (antialiased) and a mixed up/down scale
        reference = F.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            size=size,
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        np.testing.assert_allclose(resize(image, *size), reference[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_greedy_generation_equals_pytorch_and_crops_the_context(gpt):
    member, path = gpt
    prompt, steps = b"Hello, zoo!", 12  # 11 + 12 bytes > context 16: the context is cropped
    tokens = torch.tensor([list(prompt)])
    with torch.no_grad():
        for _ in range(steps):
            next_token = member(tokens[:, -CONTEXT:])[0, -1].argmax()
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    predictor = Predictor(path)
    expected = bytes(tokens[0, len(prompt) :].tolist())
    for use_cache in (True, False):
        assert predictor.generate_bytes(prompt, max_new_bytes=steps, use_cache=use_cache) == expected
        assert predictor.generate_bytes(prompt.decode(), max_new_bytes=steps, use_cache=use_cache) == expected


def test_sampling_is_reproducible_with_a_seed(gpt):
    predictor = Predictor(gpt[1])
    first = predictor.generate_bytes("abc", max_new_bytes=24, temperature=1.0, seed=7)
    assert len(first) == 24
    assert predictor.generate_bytes("abc", max_new_bytes=24, temperature=1.0, seed=7) == first
    assert predictor.generate_bytes("abc", max_new_bytes=24, temperature=1.0, seed=8) != first


class CountingSession:
    """An onnxruntime session that records how many positions each call computes."""

    def __init__(self, session):
        self.session, self.positions = session, []

    def run(self, outputs, feed):
        self.positions.append(feed["input"].shape[1])
        return self.session.run(outputs, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize(
    "prompt, steps",
    [(b"Hi", 10), (b"Hello, zoo!", 12), (b"0123456789abcdefXYZ", 6)],
    ids=["fits", "crosses-context", "longer-than-context"],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_uncached_byte_for_byte(gpt, prompt, steps, temperature):
    cached, uncached = Predictor(gpt[1]), Predictor(gpt[1])
    assert cached.has_cache and cached.metadata["kv_cache"] == 4
    cached.session, uncached.session = CountingSession(cached.session), CountingSession(uncached.session)
    with_cache = cached.generate_bytes(prompt, steps, temperature, seed=3)
    assert with_cache == uncached.generate_bytes(prompt, steps, temperature, seed=3, use_cache=False)
    # Uncached, every byte recomputes its window; cached, each byte computes one new position
    # until the text outgrows the context (absolute positions shift), then it recomputes too.
    windows = [min(len(prompt) + i, CONTEXT) for i in range(steps)]
    assert uncached.session.positions == windows
    fits = sum(len(prompt) + i <= CONTEXT for i in range(steps))
    assert cached.session.positions == ([len(prompt)] + [1] * (fits - 1) if fits else []) + windows[fits:]


def test_generate_returns_text_and_bytes_on_request(gpt):
    predictor = Predictor(gpt[1])
    raw = predictor.generate_bytes("abc", max_new_bytes=40, temperature=1.0, seed=0)
    text = predictor.generate("abc", max_new_bytes=40, temperature=1.0, seed=0)
    assert isinstance(text, str) and text == raw.decode("utf-8", errors="replace")
    assert "\ufffd" in text  # an untrained byte model emits invalid UTF-8, which is replaced


def test_cuda_is_never_a_silent_fallback(resnet):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            assert Predictor(resnet[1], device="cuda").providers[0] == "CUDAExecutionProvider"
        except ValueError as err:
            assert "CUDA" in str(err) and "\n" not in str(err)
        return
    with pytest.raises(ValueError, match="CUDA was requested but onnxruntime's CUDA provider is not installed") as err:
        Predictor(resnet[1], device="cuda")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="device must be"):
        Predictor(resnet[1], device="tpu")


def test_bad_files_and_wrong_inputs_give_one_line_errors(resnet, gpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        Predictor(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        Predictor(corrupt)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["input"], ["logits"])],
        "foreign",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(ValueError, match="not a zoo export"):
        Predictor(foreign)
    image_model, language_model = Predictor(resnet[1]), Predictor(gpt[1])
    with pytest.raises(ValueError, match="image classifier; it cannot generate"):
        image_model.generate("hi")
    with pytest.raises(ValueError, match="language model; it cannot classify"):
        language_model.classify(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        image_model.classify(np.full((32, 32, 3), 200.0))
    with pytest.raises(ValueError, match="H x W x C"):
        image_model.classify(np.zeros((32, 32, 7), np.uint8))
    with pytest.raises(ValueError, match="not a readable image"):
        image_model.classify(corrupt)
    with pytest.raises(ValueError, match="prompt is empty"):
        language_model.generate(b"")


def top_k_line(name, best) -> str:
    return f"{name}: " + ", ".join(f"{label} {p:.4f}" for label, p in best)


def test_zoo_run_prints_top_k_and_generates(resnet, gpt, tmp_path):
    runner = CliRunner()
    image = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    png, npy = tmp_path / "x.png", tmp_path / "x.npy"
    Image.fromarray(image).save(png)
    np.save(npy, image)
    result = runner.invoke(app, ["run", str(resnet[1]), str(png), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    best = Predictor(resnet[1]).top_k(image, k=3)[0]
    assert result.stdout == top_k_line(png, best) + "\n"
    assert runner.invoke(app, ["run", str(resnet[1]), str(npy), "--top-k", "3"]).stdout == top_k_line(npy, best) + "\n"

    result = runner.invoke(
        app, ["run", str(gpt[1]), "Hello", "--max-bytes", "5", "--temperature", "0.7", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.encode().startswith(b"Hello")

    result = runner.invoke(app, ["run", str(resnet[1]), str(png), "--device", "cuda"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert result.exit_code == 1 and result.stderr.startswith(
            "error: CUDA was requested but onnxruntime's CUDA provider is not installed"
        )
        assert len(result.stderr.strip().splitlines()) == 1
    assert runner.invoke(app, ["run", str(tmp_path / "none.onnx"), "x"]).exit_code == 1
    assert runner.invoke(app, ["run", str(resnet[1]), str(tmp_path / "none.png")]).stderr.startswith(
        "error: no such image file"
    )
    assert runner.invoke(app, ["run", str(resnet[1]), str(png), "--top-k", "0"]).exit_code == 2
    assert runner.invoke(app, ["run", str(resnet[1]), str(png), "--device", "tpu"]).exit_code == 2
    result = runner.invoke(app, ["run", str(gpt[1]), "two", "prompts"])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "one prompt" in result.stderr


def test_zoo_run_takes_several_images_and_folders_one_line_each(resnet, tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in (1, 2):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    first = tmp_path / "0.png"
    Image.fromarray(images[0]).save(first)
    np.save(tmp_path / "batch.npy", images[3:])
    result = CliRunner().invoke(
        app, ["run", str(resnet[1]), str(first), str(folder), str(tmp_path / "batch.npy"), "--top-k", "2"]
    )
    assert result.exit_code == 0, result.output
    best = Predictor(resnet[1]).top_k(images, k=2)
    names = [first, folder / "1.png", folder / "2.png", f"{tmp_path / 'batch.npy'}[0]", f"{tmp_path / 'batch.npy'}[1]"]
    assert result.stdout.splitlines() == [top_k_line(name, row) for name, row in zip(names, best)]

    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, message in [(empty, "holds no image files"), (tmp_path / "none.png", "no such image file")]:
        result = CliRunner().invoke(app, ["run", str(resnet[1]), str(first), str(bad)])
        assert result.exit_code == 1 and result.stderr.startswith("error: ") and message in result.stderr
        assert result.stdout == "" and result.stderr.count("\n") == 1
