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
