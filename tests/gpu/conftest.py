import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu tests/gpu` on the H200")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def compiled_kernels(monkeypatch, tmp_path):
    """Compile the Triton kernels (tests/kernels turns the interpreter on for its own
    modules) and run with the shipped defaults: no user tuning cache."""
    pytest.importorskip("triton", reason="needs triton")
    from lowbit.kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.forget_loaded_caches()


def wide_cuda_activations(m, k, dtype, seed=0):
    """x [m, k] on CUDA with K-columns spread over 6.5 decades and, when m > 1, a zero row."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.logspace(-5, 1.5, k, device="cuda")[torch.randperm(k, device="cuda", generator=g)]
    x = torch.randn(m, k, device="cuda", generator=g) * scale
    if m > 1:
        x[1] = 0
    return x.to(dtype)


def check_graph_and_compile(fn, x, x_next):
    """fn (a custom-op call) captured in a CUDA graph and replayed on x_next gives the eager
    result bit for bit, and so does torch.compile(fullgraph=True) of fn(t) * 2 on x.
    Returns the eager fn(x)."""
    y0 = fn(x)
    g = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(g):
        static_y = fn(static_x)
    static_x.copy_(x_next)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, fn(x_next))
    f = torch.compile(lambda t: fn(t) * 2, fullgraph=True)
    assert torch.equal(f(x), y0 * 2)
    return y0
