"""kvquant3 served for models whose keys the harness cannot read at k_proj: Qwen3 normalizes them before RoPE
(k_norm per head), Phi-3 projects queries, keys and values in one fused qkv_proj. vLLM hands the backend the
keys that attention takes, and the harness and the calibration must quantize those same keys. One engine each."""

import os

import pytest

from kvquant_vllm.calib.file import default_calibration_path, read_calibration
from kvquant_vllm.calib.run import calibrate_model
from kvquant_vllm.data import load_text
from kvquant_vllm.engine import shutdown
from kvquant_vllm.eval.perplexity import evaluate_methods, load_eval_model, make_windows, tokenize
from kvquant_vllm.eval.vllm_ppl import vllm_perplexity
from kvquant_vllm.models import tiny_decoder
from kvquant_vllm.quant.kvquant import kvquant_methods

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["qwen3", "phi3"])
def model_dir(request, smollm2_dir, tmp_path_factory):
    """A random-weight model (2 layers, head dim 64) with SmolLM2's tokenizer and a kvquant3 calibration."""
    model_dir = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_decoder(request.param, vocab_size=49152, hidden_size=256, intermediate_size=512, head_dim=64,
                 max_position_embeddings=2048, tie_word_embeddings=True).save_pretrained(model_dir)
    for f in smollm2_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (model_dir / f.name).symlink_to(f)
    calibrate_model(str(model_dir), {kvquant_methods()["kvquant3"].spec: default_calibration_path(model_dir)},
                    text="pydoc:train", samples=2, seq_len=512, num_workers=0)
    return model_dir


def test_engine_equals_harness(model_dir):
    from vllm import LLM

    model, tokenizer = load_eval_model(model_dir)
    windows = make_windows(tokenize(tokenizer, load_text("pydoc:test")), 256, 8)
    calibration = read_calibration(default_calibration_path(model_dir))
    harness = {r.method: r.ppl for r in evaluate_methods(model, windows, ["kvquant3"], [calibration])}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(model_dir), dtype="float32", kv_cache_dtype="kvquant3", enforce_eager=True,
              max_model_len=512, seed=0)
    try:
        engine = vllm_perplexity(llm, windows)
    finally:
        shutdown(llm)
    # Qwen3: 1.4e-4 apart. A harness that quantized its keys before the norm, with a calibration of those keys,
    # was 2 % away from the engine serving that calibration.
    assert engine == pytest.approx(harness["kvquant3"], rel=1e-3)
    assert harness["kvquant3"] != pytest.approx(harness["fp16"], rel=1e-4)  # the cache really is quantized
