"""Suite-wide settings. Tiny models spend their time in per-op overhead, where extra threads only
add contention (measured on the 2-core CI machine: 1 thread is 5-10x faster for these tests)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
