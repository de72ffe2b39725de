import os
import sys

# tests/utils.py is imported as a plain module by the tests.
sys.path.insert(0, os.path.dirname(__file__))
# The official rwkv package reads these at import time; the reference runs in plain PyTorch.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread: on a shared 2-core machine (CI) two spinning
    threads made tiny forwards up to 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
