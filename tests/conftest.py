"""Suite-wide settings.

One intra-op thread per process: the suite runs CLI subprocesses and 2-process DDP beside
pytest on a 2-core machine, and oversubscribed torch threads were measured 10-50x slower
(a ResNet-20 step: 1 s with 2 threads on a busy machine, 20 ms with 1). Set before torch
is imported so that subprocesses inherit it.

Text caches (``text:PATH``) go to a folder of the session's own, not the user's cache.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
    os.environ["ZOO_CACHE_DIR"] = str(tmp_path_factory.mktemp("zoo-cache"))


# ----- the device of the exactness tests ----------------------------------------------------------
EXACTNESS_DEVICE_VARIABLE = "ZOO_TEST_DEVICE"


def _exactness_device() -> torch.device:
    return torch.device(os.environ.get(EXACTNESS_DEVICE_VARIABLE, "cpu"))


def pytest_configure(config):
    """ZOO_TEST_DEVICE=cuda on a machine without CUDA is a mistake to say at once, not a skip."""
    try:
        device = _exactness_device()
    except RuntimeError as err:
        raise pytest.UsageError(f"{EXACTNESS_DEVICE_VARIABLE}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{EXACTNESS_DEVICE_VARIABLE}={device} but torch.cuda.is_available() is False here")


@pytest.fixture
def exactness_device() -> str:
    """Where the exactness tests (masked steps, update rules, resume) train: ZOO_TEST_DEVICE,
    default cpu; ``ZOO_TEST_DEVICE=cuda`` proves them on a GPU."""
    return str(_exactness_device())


@pytest.fixture
def on_exactness_device(exactness_device):
    """The exactness device as torch's default device for the test: models, tensors and
    generators made without a device land on it."""
    previous = torch.get_default_device()
    torch.set_default_device(exactness_device)
    yield torch.device(exactness_device)
    torch.set_default_device(previous)
