"""Shared fixtures."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton wraps its
# own library functions (tl.cdiv ...) for the interpreter only if TRITON_INTERPRET is
# set when triton is first imported, and any test module may import it first
# (transformers, compressed-tensors, lowbit.kernels): set it before all of them.
# The GPU tests turn it off per test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: on a shared 2-core machine, waking the intra-op thread pool
    costs ~20 ms per op; one thread keeps a module of tiny tests fast. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
