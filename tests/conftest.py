import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which triton.jit picks when a kernel is
# defined: it must be on before anything (transformers, vLLM) first imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: engine-level test (real vLLM engine or full model runs)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a safetensors directory (prepared once, cached)."""
    from kvquant_vllm.models import prepare_model

    return prepare_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model():
    from kvquant_vllm.models import tiny_decoder

    return tiny_decoder(seed=0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def kvquant_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 weights beside a kvquant3 calibration in the default place (MODEL_DIR/kvquant_calibration.safetensors).

    A short calibration (4 x 512 tokens of pydoc's first half) keeps the session fast; the quality
    numbers in benchmarks/results use 16 x 2048.
    """
    from kvquant_vllm.calib.file import default_calibration_path
    from kvquant_vllm.calib.run import calibrate_model
    from kvquant_vllm.quant.kvquant import kvquant_methods

    model_dir = tmp_path_factory.mktemp("smollm2-kvquant")
    for f in smollm2_dir.iterdir():
        (model_dir / f.name).symlink_to(f)
    calibrate_model(str(model_dir), {kvquant_methods()["kvquant3"].spec: default_calibration_path(model_dir)},
                    text="pydoc:train", samples=4, seq_len=512)
    return model_dir
