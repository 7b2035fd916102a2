"""kvquant3 in a bf16 vLLM engine (CPU backend): on CPUs with AVX512-BF16 or AMX the C++ kernels take a bf16
model's prefill blocks of 16 rows in bf16 products (``vdpbf16ps`` or tiles), the path that serves bf16 models
there; elsewhere the same engine runs the float32 products. The other engine tests run float32 models.

The prompts are prefilled in 128-token steps, so every prefill item holds 384 rows (128 tokens x 3 query heads).
"""

import os

import pytest

from kvquant_vllm.calib.file import default_calibration_path, read_calibration
from kvquant_vllm.data import load_text
from kvquant_vllm.engine import shutdown
from kvquant_vllm.eval.perplexity import evaluate_methods, load_eval_model, make_windows, tokenize
from kvquant_vllm.eval.vllm_ppl import vllm_perplexity

pytestmark = pytest.mark.slow


def _bf16_perplexity(model_dir, kv_cache_dtype: str, windows) -> float:
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(model_dir), dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, enforce_eager=True,
              max_model_len=1024, max_num_batched_tokens=128, seed=0)
    try:
        return vllm_perplexity(llm, windows)
    finally:
        shutdown(llm)


def test_bf16_engine_perplexity_equals_the_float32_harness(kvquant_model_dir):
    """8 x 512 tokens: the bf16 engines' prompt perplexities are the float32 harness's within bf16 rounding
    (measured with a 16 x 2048-token calibration: 0.04 % apart for auto, 0.7 % for kvquant3). The bf16 products
    with the values of neighbouring key pairs swapped gave a kvquant3 perplexity of 3,410."""
    model, tokenizer = load_eval_model(kvquant_model_dir)
    windows = make_windows(tokenize(tokenizer, load_text("pydoc:test")), 512, 8)
    calibration = read_calibration(default_calibration_path(kvquant_model_dir))
    harness = {r.method: r.ppl for r in evaluate_methods(model, windows, ["kvquant3"], [calibration])}
    unquantized = _bf16_perplexity(kvquant_model_dir, "auto", windows)
    quantized = _bf16_perplexity(kvquant_model_dir, "kvquant3", windows)
    assert unquantized == pytest.approx(harness["fp16"], rel=0.01)
    assert quantized == pytest.approx(harness["kvquant3"], rel=0.02)
    # The cache really is quantized: the bf16 engine's kvquant3 loss is above its 16-bit one by the harness's gap.
    assert quantized - unquantized > 0.5 * (harness["kvquant3"] - harness["fp16"])
