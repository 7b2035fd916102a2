"""The prepared model runs in a real vLLM engine (CPU backend) and generates the expected text."""

import pytest

from kvquant_vllm.demo import PROMPTS, generate

pytestmark = pytest.mark.slow


def test_vllm_generates_coherent_text(smollm2_dir):
    outputs, capacity = generate(str(smollm2_dir), kv_cache_dtype="auto", max_tokens=24)
    assert capacity > 10_000
    assert len(outputs) == len(PROMPTS)
    assert "Paris" in outputs[0]
    assert "list" in outputs[2].lower()
    assert all(len(o.split()) >= 5 for o in outputs)
