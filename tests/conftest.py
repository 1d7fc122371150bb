"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: on a shared 2-core machine, waking the intra-op thread pool
    costs ~20 ms per op; one thread keeps a module of tiny tests fast. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
