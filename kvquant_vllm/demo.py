"""``make demo``: generate with vLLM on the bundled model, then print a small perplexity table."""

from __future__ import annotations

import os

from kvquant_vllm.models import resolve_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a Python list is.",
    "Give three tips for staying focused while studying.",
]

DEMO_METHODS = ["int4-token", "int3-token"]


def generate(model_dir: str, kv_cache_dtype: str = "auto", max_tokens: int = 48) -> list[str]:
    """Greedy chat completions of ``PROMPTS`` from an offline vLLM engine on ``model_dir``."""
    from vllm import LLM, SamplingParams

    # The CPU backend sizes its KV cache from this (GiB); keep it small so the demo fits any machine.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(
        model=model_dir,
        kv_cache_dtype=kv_cache_dtype,
        dtype="bfloat16",
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
    )
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    try:
        outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=True)
    finally:
        # Stop the engine processes now rather than from a finalizer at interpreter exit.
        llm.llm_engine.engine_core.shutdown()
    return [o.outputs[0].text for o in outputs]


def run_demo(model: str) -> None:
    from kvquant_vllm.eval.perplexity import format_table, run_ppl

    model_dir = str(resolve_model(model))
    print(f"== vLLM offline generation ({model_dir}, kv_cache_dtype=auto)")
    for prompt, text in zip(PROMPTS, generate(model_dir)):
        print(f"\n> {prompt}\n{text.strip()}")

    report = run_ppl(model_dir, DEMO_METHODS, seq_len=1024, max_windows=4, text="pydoc")
    print(f"\n== perplexity (fp32 model, KV cache fake-quantized): {report.describe()}")
    print(format_table(report.results))
