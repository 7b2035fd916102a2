from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: engine-level test (real vLLM engine or full model runs)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a safetensors directory (prepared once, cached)."""
    from kvquant_vllm.models import prepare_model

    return prepare_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model():
    from kvquant_vllm.models import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
