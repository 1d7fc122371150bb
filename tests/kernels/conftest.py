"""Shared by the kernel tests, which run Triton's CPU interpreter."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch, tmp_path):
    # the kernels read TRITON_INTERPRET when they launch: keep it on for these
    # modules even if another module (tests/gpu) turned it off; no user tuning cache
    from lowbit.kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.forget_loaded_caches()


def _wide_activations(m, k, dtype, seed=0):
    """x [m, k] with K-columns spread over 6.5 decades (subnormal FP8 codes appear)
    and, when m > 1, a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-5, 1.5, k)[torch.randperm(k, generator=g)]
    if m > 1:
        x[1] = 0
    return x.to(dtype)
