"""kvquant3 inside real vLLM engines (CPU backend): the engine really attends over the quantized pages.

One kvquant3 engine serves the module; the fp32 `auto` engine and the small-budget engine exist
only for the tests that compare against them.
"""

import os

import pytest
import torch

from kvquant_vllm.calib.file import default_calibration_path, read_calibration
from kvquant_vllm.data import load_text
from kvquant_vllm.engine import kv_capacity_tokens, shutdown
from kvquant_vllm.eval.perplexity import evaluate_methods, load_eval_model, make_windows, tokenize
from kvquant_vllm.eval.vllm_ppl import vllm_perplexity

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colors are"]
# Greedy kvquant3 continuations (fp32 model, the kvquant_model_dir calibration), recorded on x86-64 CPU.
EXPECTED = [
    " Paris.\n\nThe answer is: 2\n\nThe answer is:",
    "\n    n = 10\n    while n > 1:\n        n =",
    " around 1,000°C, which is significantly higher than the",
    " the primary colors of the RGB color model: red, blue, and green.",
]


def _engine(model_dir, **kwargs):
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    return LLM(**(args | kwargs))


def _greedy(llm, prompts, max_tokens=16):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def engine(kvquant_model_dir):
    llm = _engine(kvquant_model_dir, kv_cache_dtype="kvquant3", enable_prefix_caching=True)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def auto_engine(kvquant_model_dir):
    llm = _engine(kvquant_model_dir, kv_cache_dtype="auto", enable_prefix_caching=False)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def windows(kvquant_model_dir):
    _, tokenizer = load_eval_model(kvquant_model_dir)
    return make_windows(tokenize(tokenizer, load_text("pydoc:test")), 512, 3)


def test_prompt_perplexity_equals_fake_quant_harness(engine, auto_engine, windows, kvquant_model_dir):
    model, _ = load_eval_model(kvquant_model_dir)
    calibration = read_calibration(default_calibration_path(kvquant_model_dir))
    harness = {r.method: r.ppl for r in evaluate_methods(model, windows, ["kvquant3"], [calibration])}
    quantized, unquantized = vllm_perplexity(engine, windows), vllm_perplexity(auto_engine, windows)
    assert quantized == pytest.approx(harness["kvquant3"], rel=0.01)
    assert unquantized == pytest.approx(harness["fp16"], rel=0.01)
    # The cache really is quantized: the engine's kvquant3 loss is the harness's, not the 16-bit one.
    assert quantized - unquantized > 0.5 * (harness["kvquant3"] - harness["fp16"])


def test_greedy_outputs(engine):
    outputs = _greedy(engine, PROMPTS)
    assert "Paris" in outputs[0]
    assert all(len(o.split()) >= 4 for o in outputs)
    assert outputs == EXPECTED


def test_capacity_against_auto(engine, auto_engine):
    # Same 1 GiB budget; auto here is fp32 (32-bit), so the bf16 ratio is half of this one.
    assert kv_capacity_tokens(engine) >= 2 * 4.3 * kv_capacity_tokens(auto_engine)


def test_prefix_cache_hit_gives_identical_outputs(engine, windows):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prefix = windows[0, :600].tolist()  # two full 256-token blocks are cached and reused
    prompts = [TokensPrompt(prompt_token_ids=prefix + windows[1, i * 7:i * 7 + 5].tolist()) for i in range(3)]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    cold = []
    for prompt in prompts:  # each computed from scratch: prefix caching off for this request
        engine.reset_prefix_cache()
        cold += engine.generate([prompt], params, use_tqdm=False)
    assert all(o.num_cached_tokens == 0 for o in cold)
    warm = engine.generate(prompts, params, use_tqdm=False)
    assert all(o.num_cached_tokens >= 512 for o in warm)  # read back from the quantized pages
    assert [o.outputs[0].text for o in warm] == [o.outputs[0].text for o in cold]


def test_preemption_finishes_every_request(kvquant_model_dir, windows):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=windows[i % 3, i * 20:i * 20 + 200].tolist()) for i in range(8)]
    # 4 blocks of 256 tokens: four requests start with one block each and all need a second one at
    # token 256, so the scheduler must preempt (and later recompute) to finish 8 x 300 tokens.
    small = _engine(kvquant_model_dir, kv_cache_dtype="kvquant3", enable_prefix_caching=False,
                    num_gpu_blocks_override=4, max_model_len=512)
    try:
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        outs = small.generate(prompts, params, use_tqdm=False)
    finally:
        shutdown(small)
    assert [len(o.outputs[0].token_ids) for o in outs] == [100] * 8
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
