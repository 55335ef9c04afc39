"""Fixtures of the decoding tests."""

import pytest


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    """The tiny random Llama as this library's model, one per test module."""
    from iapo_jax import load_model

    return load_model(tiny_llama_dir)
