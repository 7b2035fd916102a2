"""Small helpers around an offline vLLM ``LLM`` shared by the demo, benchmarks and tests."""

from __future__ import annotations


def kv_capacity_tokens(llm) -> int:
    """The KV cache capacity in tokens that the engine allocated (blocks x block size)."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def shutdown(llm) -> None:
    """Stop the engine processes now rather than from a finalizer at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()
