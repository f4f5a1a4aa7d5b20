"""The training loop at scale: gradient accumulation, mixed precision, EMA, torch.compile,
channels-last, and torch's launcher across two "nodes" with synchronised batch norm."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli.commands  # noqa: F401  (registers the commands)
import zoo
from cli.app import app
from training import distributed
from training.checkpoint import load_checkpoint
from training.masking import MaskCache, masked_step
from training.precision import Precision
from training.trainer import Reporter, TrainConfig, Trainer, train
from zoo import registry
from zoo.models._builder import build
from zoo.models.resnet import SlimResNet
from zoo.registry import Variant


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(Path(zoo.__file__).parent.glob("*.py"))))
    return corpus


def _run(config: TrainConfig) -> tuple[Trainer, list[tuple[int, ...]]]:
    """A run in this process; returns its trainer and the input shape of every training forward."""
    trainer = Trainer(config, distributed.setup(config.dist.device), Reporter())
    shapes: list[tuple[int, ...]] = []
    hook = trainer.model.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape)) if module.training else None
    )
    trainer.run()
    hook.remove()
    return trainer, shapes


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_accumulated_micro_batches_match_one_batch_of_twice_the_size(tmp_path):
    """A sandwich step (the smaller members distil from the largest's outputs on the same
    micro-batch) of a LayerNorm family, SGD with momentum: two micro-batches of 4 give the
    step one batch of 8 gives, up to float rounding (~1e-7); a wrong loss scale or a missing
    micro-batch moves the weights by ~1e-3."""
    case = dict(model="slim_gpt_nano", data=f"text:{_corpus(tmp_path)}", strategy="sandwich", widths=[0.5], seq_len=16,
                steps=3, batch_size=8, optimizer="sgd", lr=0.05, warmup_steps=0, eval_every=100)  # fmt: skip
    whole, whole_shapes = _run(TrainConfig.from_flags(out=str(tmp_path / "whole"), **case))
    accumulated, shapes = _run(TrainConfig.from_flags(out=str(tmp_path / "accum"), accum_steps=2, **case))
    assert set(whole_shapes) == {(8, 16)} and set(shapes) == {(4, 16)}
    assert len(shapes) == 2 * len(whole_shapes)  # every pass of every step, on each micro-batch
    assert _max_diff(_params(whole.model), _params(accumulated.model)) < 1e-5
    initial = _params(zoo.create_model("slim_gpt_nano", context_length=16, widths=[0.5, 1.0]))
    assert _max_diff(_params(whole.model), initial) > 1e-3  # (a different init, but it shows the scale moved)


def test_fp16_loss_scaling_skips_an_overflowed_step_and_masks_a_taken_one_exactly():
    """A core step (width 0.5) with fp16's gradient scaler: an inf in the gradient skips the
    whole step (parameters and momentum unchanged bit for bit, the scale halves); a finite one
    equals the unscaled masked step bit for bit, and a policy's look-ahead reads the unscaled
    gradient (the scale is a power of two; the forward is float32 here so that only the
    scaler differs)."""
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = zoo.create_model("slim_resnet20", num_classes=10, in_chans=1, img_size=8, widths=[0.5, 1.0])
    optimizer = create_optimizer_v2(model, "momentum", lr=0.1, weight_decay=5e-4, momentum=0.9)
    inputs, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()  # momentum everywhere, so a masked coordinate has state that must stay
    optimizer.zero_grad(set_to_none=True)
    masks = MaskCache(model).member(zoo.Member(0.5))
    model.set_member(width=0.5, for_training=True)
    reference = copy.deepcopy(model)
    reference_optimizer = create_optimizer_v2(reference, "momentum", lr=0.1, weight_decay=5e-4, momentum=0.9)
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # (a plain load shares the tensors)

    precision = Precision("fp16", torch.device("cpu"))
    before, state_before = _params(model), copy.deepcopy(optimizer.state_dict())
    precision.backward(torch.nn.functional.cross_entropy(model(inputs), targets))
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    precision.step(optimizer, masks, None, model.parameters())
    optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["momentum_buffer"], state_before["state"][i]["momentum_buffer"]) for i in after)
    assert precision.scaler.get_scale() == 2.0**15

    # What a look-ahead policy (extragradient) reads: the true gradient, not the scaled one.
    precision.unscaled(
        lambda: precision.backward(torch.nn.functional.cross_entropy(model(inputs), targets)), model.parameters()
    )()
    torch.nn.functional.cross_entropy(reference(inputs), targets).backward()
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()) if q.grad is not None
    )
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(precision.scaler.get_scale())  # scaled again, as the step's own backward leaves it
    precision.step(optimizer, masks, None, model.parameters())
    masked_step(
        reference_optimizer, {reference.get_parameter(n): masks[p] for n, p in model.named_parameters() if p in masks}
    )
    got, expected = _params(model), _params(reference)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert _max_diff(got, before) > 1e-4  # the core moved
    names = {p: n for n, p in model.named_parameters()}
    assert all(torch.equal(p.detach()[~m], before[names[p]][~m]) for p, m in masks.items())  # the rest did not


def test_bf16_ema_and_channels_last_run_end_to_end_and_the_ema_resumes(tmp_path):
    """`zoo train --amp bf16 --channels-last --accum-steps 2 --ema` on CPU, stopped after step 1
    and resumed: the EMA weights file holds timm's average with its warmup decay
    (``1 - (1 + 1) ** -2/3`` at step 2) of the step-1 and step-2 weights."""
    out = tmp_path / "run"
    args = ["train", "slim_resnet20", "--width", "0.5", "--steps", "2", "--batch-size", "16", "--eval-every", "100",
            "--amp", "bf16", "--channels-last", "--accum-steps", "2", "--ema", "--out", str(out)]  # fmt: skip
    assert _invoke(*args, "--stop-after", "1").exit_code == 0
    step1 = load_checkpoint(out / "checkpoint.pt")
    assert all(torch.equal(step1["ema"][f"module.{k}"], v) for k, v in step1["model"].items())  # decay 0 at step 1
    done = _invoke(*args, "--resume")
    assert done.exit_code == 0, done.output
    assert f"{out / 'model_ema.safetensors'}" in done.stdout

    model, ema = load_file(out / "model.safetensors"), load_file(out / "model_ema.safetensors")
    decay = 1 - 2 ** (-2 / 3)
    params = [k for k in model if ".running_" not in k]  # batch-norm statistics are recalibrated
    expected = {k: step1["model"][k].float().lerp(model[k], 1 - decay) for k in params}
    assert _max_diff({k: ema[k] for k in params}, expected) < 1e-6
    assert _max_diff({k: ema[k] for k in params}, {k: model[k] for k in params}) > 1e-4
    header = zoo.read_header(out / "model_ema.safetensors")["metadata"]
    assert [m["subnet"] for m in header["metrics"]] == [{"width": 0.5}, {"width": 1.0}]
    assert header["train"]["ema_decay"] == 0.9998 and header["train"]["amp"] == "bf16"
    assert header["train"]["config"]["channels_last"] is True
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"ema": true' in line for line in lines) == 2


def _compiled_and_eager(model: str, backend: str, tmp_path: Path) -> tuple[Trainer, Trainer]:
    """`--compile --compile-backend BACKEND` on two members (width 0.5 and 1.0, 4 steps), then
    the same run eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    case = dict(model=model, widths=[0.5], steps=4, batch_size=16, img_size=8, eval_every=100, lr=0.05)
    compiled, _ = _run(
        TrainConfig.from_flags(out=str(tmp_path / "compiled"), compile=True, compile_backend=backend, **case)
    )
    eager, _ = _run(TrainConfig.from_flags(out=str(tmp_path / "eager"), **case))
    return compiled, eager


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_builds_one_graph_per_member_and_trains_as_eager(backend, tmp_path):
    """`--compile` on two members: each member's graph is captured once, the first time it
    trains, and reused (4 steps, 2 graphs, no graph break); the weights match an eager run.
    aot_eager (dynamo's capture and AOT autograd, no code generation: 5 s) runs in CI;
    inductor (its C++ code generation: 40 s for the two members on a quiet core) is slow,
    and runs in CI on a one-block ResNet (the next test)."""
    from torch._dynamo.utils import counters

    compiled, eager = _compiled_and_eager("slim_resnet20", backend, tmp_path)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert _max_diff(_params(compiled.model), _params(eager.model)) < 1e-4


@pytest.fixture
def tiny_resnet(monkeypatch) -> str:
    """A ResNet of the family's own classes with one basic block of 8 channels, as a variant in
    zoo's catalogue for the test (the trainer builds its model by name); removed afterwards."""
    fixed = dict(block="basic", layers=(1,), channels=(8,), stem="cifar")

    def entrypoint(pretrained=False, **kwargs):
        return build("tiny_resnet", pretrained, kwargs)

    variant = Variant("tiny_resnet", "resnet", SlimResNet, fixed, {"num_classes": 10, "img_size": 32}, entrypoint)
    monkeypatch.setitem(registry._VARIANTS, "tiny_resnet", variant)
    return "tiny_resnet"


@pytest.mark.slow  # ~33 s of CPU (inductor compiles each member); aot_eager below stays in CI
def test_inductor_generates_a_forward_and_backward_per_member_that_train_as_eager(tiny_resnet, tmp_path, monkeypatch):
    """`--compile` with inductor, the default backend, generating and compiling its C++ kernels
    for real: in a fresh, empty cache (torch keeps only its precompiled header, which holds no
    code of the model), every member's forward and backward are generated (4 graphs, none from
    the cache) and train as eager does. Dynamo's recompile limit is set to 1 first, so the second
    member is compiled only because compile_model raises it (at 1 it would run eagerly); after
    the import of timm.optim, which sets it to 1e6 for its Kron optimizer.
    Kept as small as that allows (25 s of CPU, half of it g++; 31 s with torch's header not yet
    precompiled): a one-block ResNet (13 kernels in all), inductor compiling in this process (no
    pool of workers to start) and trusting the CPU's own list of vector instructions instead of
    compiling a probe program for each (6 s)."""
    import timm.optim  # noqa: F401  (the trainer's optimizers; its import sets the limit)
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import fresh_cache

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    with (
        fresh_cache(dir=str(tmp_path), delete=False),
        inductor_config.patch({"compile_threads": 1, "cpp.vec_isa_ok": True}),
    ):
        compiled, eager = _compiled_and_eager(tiny_resnet, "inductor", tmp_path)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert counters["inductor"]["fxgraph_cache_miss"] == 4 and not counters["inductor"]["fxgraph_cache_hit"]
    assert len(list(tmp_path.rglob("*.so"))) >= 4  # the generated kernels, compiled in the test's cache
    assert _max_diff(_params(compiled.model), _params(eager.model)) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_match_one_process_with_sync_bn(tmp_path):
    """Two `zoo train --nnodes 2` commands of one process each, meeting in a c10d rendezvous on
    127.0.0.1, train a batch-norm family with --sync-bn as one process with the same global
    batch: ~1e-7 apart, where per-process batch statistics put them ~1e-2 apart."""
    case = ["slim_resnet20", "--width", "0.5", "--steps", "3", "--batch-size", "16", "--eval-every", "100",
            "--lr", "0.05", "--warmup-steps", "0", "--sync-bn"]  # fmt: skip
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "train",
                *case,
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "two-nodes",
                "--out",
                str(tmp_path / "nodes"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    config = TrainConfig.from_flags(out=str(tmp_path / "single"), model="slim_resnet20", widths=[0.5], steps=3,
                                    batch_size=16, eval_every=100, lr=0.05, warmup_steps=0, sync_bn=True)  # fmt: skip
    single = train(config)
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum(out.count("wrote") for out, _ in outputs) == 1  # global rank 0 alone writes
    expected, got = load_file(single.model_path), load_file(tmp_path / "nodes" / "model.safetensors")
    assert _max_diff(expected, got) < 1e-5
    assert zoo.read_header(tmp_path / "nodes" / "model.safetensors")["metadata"]["train"]["world_size"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["slim_resnet20", "--accum-steps", "0"], "--accum-steps must be at least 1"),
        (
            ["slim_resnet20", "--batch-size", "8", "--accum-steps", "3"],
            "--batch-size 8 does not split into 1 process(es) x 3 micro-batches",
        ),
        (["slim_resnet20", "--ema-decay", "0.99"], "--ema-decay needs --ema"),
        (["slim_resnet20", "--ema", "--ema-decay", "1.5"], "--ema-decay must be in (0, 1), got 1.5"),
        (["slim_resnet20", "--compile-backend", "aot_eager"], "--compile-backend needs --compile"),
        (["slim_resnet20", "--compile", "--compile-backend", "nope"], "--compile-backend must be one of"),
        (
            ["slim_resnet20", "--compile", "--strategy", "random", "--space", "layerwise"],
            "--space layerwise draws a new member almost every step",
        ),
        (
            ["slim_gpt_nano", "--channels-last"],
            "--channels-last applies to image models (CNNs); slim_gpt_nano reads tokens",
        ),
        (["slim_gpt_nano", "--sync-bn"], "--sync-bn: this family has no batch norm"),
        (["slim_resnet20", "--nproc-per-node", "0"], "--nproc-per-node must be at least 1, got 0"),
        (["slim_resnet20", "--nnodes", "0"], "--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got '0'"),
        (["slim_resnet20", "--nnodes", "2:1"], "--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got '2:1'"),
        (["slim_resnet20", "--max-restarts", "-1"], "--max-restarts must be at least 0, got -1"),
        (["slim_resnet20", "--dist-timeout", "0"], "--dist-timeout must be positive"),
        (["slim_resnet20", "--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (
            ["slim_resnet20", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"],
            "--node-rank must be in [0, 1] for --nnodes 2, got 2",
        ),
        (["slim_resnet20", "--nnodes", "2", "--rdzv-endpoint", "node0"], "--rdzv-endpoint must be HOST:PORT"),
        (["slim_resnet20", "--nnodes", "2", "--rdzv-endpoint", "node0:70000"], "with a port in 1..65535"),
        (["slim_resnet20", "--rdzv-id", "my run"], "--rdzv-id must be a non-empty name"),
    ],
)
def test_bad_loop_flags_are_one_line(args, message, tmp_path):
    result = _invoke("train", *args, "--steps", "2", "--out", str(tmp_path / "run"))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_unknown_amp_is_a_usage_error(tmp_path):
    result = _invoke("train", "slim_resnet20", "--amp", "fp8", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "Traceback" not in result.output and "fp8" in result.output


@pytest.mark.slow  # about 5 minutes on 2 cores
def test_the_gpu_check_runs_every_step_in_its_cpu_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --cpu-dry-run: data, the three loops of both models, the
    exactness tests, the real `zoo train`, `zoo export` and the Predictor, on the CPU at tiny
    sizes (tests/test_gpu_check.py runs its --tiny version in CI)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out-dir", str(tmp_path)],
        cwd=root,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "summary.md").read_text().count("| ok |") == 9
    assert len(list(tmp_path.iterdir())) <= 8
    for name, unit in (("image_loops", "images_per_s"), ("text_loops", "tokens_per_s")):
        loops = json.loads((tmp_path / f"{name}.json").read_text())["loops"]
        assert set(loops) == {"timm", "zoo", "zoo-compiled"} and all(v[unit] > 0 for v in loops.values())
    report = json.loads((tmp_path / "predictor.json").read_text())
    assert report["providers"] == ["CPUExecutionProvider"] and report["top1_agreement_with_cpu"] == 1.0
