"""``make demo``: serve the bundled model from a 3-bit kvquant cache with vLLM.

Calibrates the model if it has no calibration yet, generates with ``kv_cache_dtype="kvquant3"``,
prints its KV capacity against a 16-bit ``"auto"`` cache (bf16 model) for the same memory, then a small
perplexity table of the fake-quant harness.

Text is generated with float32 weights: vLLM's CPU attention over bfloat16 garbles this model's greedy text
on CPUs with AMX (a bf16 model, or a float32 model with a bfloat16 cache); float32 gives the model's own answers.
"""

from __future__ import annotations

import os

from kvquant_vllm.engine import kv_capacity_tokens, shutdown
from kvquant_vllm.models import resolve_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a Python list is.",
    "Give three tips for staying focused while studying.",
]

DEMO_METHODS = ["int4-token", "int3-token", "kvquant3"]


def ensure_calibration(model_dir: str) -> str:
    """MODEL_DIR/kvquant_calibration.safetensors for kvquant3, calibrated on pydoc's first half if missing."""
    from kvquant_vllm.calib.file import default_calibration_path
    from kvquant_vllm.calib.run import calibrate_model
    from kvquant_vllm.quant.kvquant import kvquant_methods

    path = default_calibration_path(model_dir)
    if not path.is_file():
        print(f"== calibrating kvquant3 for {model_dir} on pydoc:train (16 x 2048 tokens)")
        calibrate_model(model_dir, {kvquant_methods()["kvquant3"].spec: path}, text="pydoc:train")
    return str(path)


def generate(model_dir: str, kv_cache_dtype: str = "auto", max_tokens: int = 48,
             dtype: str = "float32") -> tuple[list[str], int]:
    """Greedy chat completions of ``PROMPTS`` from an offline vLLM engine on ``model_dir`` with weights of
    ``dtype``, and the engine's KV cache capacity in tokens."""
    from vllm import LLM, SamplingParams

    # The CPU backend sizes its KV cache from this (GiB); keep it small so the demo fits any machine.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(
        model=model_dir,
        kv_cache_dtype=kv_cache_dtype,
        dtype=dtype,
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
    )
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    try:
        outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=True)
        capacity = kv_capacity_tokens(llm)
    finally:
        shutdown(llm)
    return [o.outputs[0].text for o in outputs], capacity


def run_demo(model: str) -> None:
    from kvquant_vllm.eval.perplexity import format_table, run_ppl

    model_dir = str(resolve_model(model))
    calibration = ensure_calibration(model_dir)
    print(f"== vLLM offline generation ({model_dir}, kv_cache_dtype=kvquant3)")
    texts, capacity = generate(model_dir, "kvquant3")
    for prompt, text in zip(PROMPTS, texts):
        print(f"\n> {prompt}\n{text.strip()}")
    _, auto_capacity = generate(model_dir, "auto", max_tokens=1, dtype="bfloat16")
    print(f"\n== KV cache capacity for the same {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB: "
          f"auto (bf16) {auto_capacity:,} tokens, kvquant3 {capacity:,} tokens: {capacity / auto_capacity:.2f}x")

    report = run_ppl(model_dir, DEMO_METHODS, seq_len=1024, max_windows=4, text="pydoc:test",
                     calibration_files=[calibration])
    print(f"\n== perplexity (fp32 model, KV cache fake-quantized): {report.describe()}")
    print(format_table(report.results))
