"""vLLM integration, loaded by vLLM through the ``vllm.general_plugins`` entry point.

``register()`` adds the ``kvquant2/3/4`` KV cache dtypes and routes the attention of layers with
those dtypes to :class:`~kvquant_vllm.vllm_plugin.backend.KVQuantAttentionBackend`; on CPU it also lets vLLM run
tensor and pipeline parallel engines on its Ray executor and in eager pipeline stages
(:mod:`~kvquant_vllm.vllm_plugin.cpu_parallel`), and with ``KVQUANT_BATCH_INVARIANT=1`` makes its float32 GEMMs
batch-invariant (:mod:`~kvquant_vllm.vllm_plugin.cpu_gemm`).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Entry point for ``vllm.general_plugins``; runs in every vLLM process, idempotent."""
    global _registered
    if _registered:
        return
    from kvquant_vllm.vllm_plugin.dtypes import add_cache_dtypes
    from kvquant_vllm.vllm_plugin.loader import skip_calibration_file
    from kvquant_vllm.vllm_plugin.platform import route_attention
    from kvquant_vllm.vllm_plugin.cpu_gemm import make_cpu_gemm_batch_invariant
    from kvquant_vllm.vllm_plugin.cpu_parallel import enable_ray_executor

    add_cache_dtypes()
    route_attention()
    skip_calibration_file()
    enable_ray_executor()
    make_cpu_gemm_batch_invariant()
    _registered = True
