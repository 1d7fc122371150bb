"""Fixtures shared by the io tests."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (transformers' GGUF loader, ~30 s): loaded once
    for every test that needs it; tests deep-copy the model before changing it."""
    from lowbit.eval.models import load_model

    return load_model("smollm2")
