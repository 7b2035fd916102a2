"""Route kvquant layers to our attention backend and check kvquant configurations up front.

vLLM's platforms choose the attention backend (the CPU platform always answers CPU_ATTN) and fix
the block size; the plugin wraps those two class methods of the current platform. Layers with any
other cache dtype keep vLLM's own choice. On CPU the config check also picks the worker that runs eager
pipeline stages (:mod:`~kvquant_vllm.vllm_plugin.cpu_parallel`), for every dtype.
"""

from __future__ import annotations

from kvquant_vllm.quant.kvquant import DEFAULT_BLOCK_SIZE
from kvquant_vllm.quant.paged import DTYPE_BITS
from kvquant_vllm.vllm_plugin.cpu_parallel import use_pipeline_worker
from kvquant_vllm.vllm_plugin.dtypes import is_kvquant_dtype

# One backend per dtype (the page layout depends on the bits, and the spec does not carry them).
BACKENDS = {dtype: (f"KVQUANT{bits}", f"kvquant_vllm.vllm_plugin.backend.KVQuant{bits}AttentionBackend")
            for dtype, bits in DTYPE_BITS.items()}


def route_attention() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for name, path in BACKENDS.values():
        if name not in AttentionBackendEnum.__members__:
            register_backend(name, path)
    platform = type(current_platform)
    if getattr(platform.get_attn_backend_cls, "_kvquant", False):
        return
    choose_backend = platform.get_attn_backend_cls.__func__
    check_config = platform.check_and_update_config.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs) -> str:
        if is_kvquant_dtype(attn_selector_config.kv_cache_dtype):
            if attn_selector_config.use_mla or attn_selector_config.has_sliding_window:
                raise ValueError(
                    f"--kv-cache-dtype {attn_selector_config.kv_cache_dtype} supports full attention with "
                    "RoPE only (no MLA, no sliding window); use another --kv-cache-dtype for this model"
                )
            return AttentionBackendEnum[BACKENDS[attn_selector_config.kv_cache_dtype][0]].get_path()
        return choose_backend(cls, selected_backend, attn_selector_config, *args, **kwargs)

    def check_and_update_config(cls, vllm_config) -> None:
        check_config(cls, vllm_config)
        if current_platform.is_cpu():
            use_pipeline_worker(vllm_config)
        cache_config = vllm_config.cache_config
        if not is_kvquant_dtype(cache_config.cache_dtype) or vllm_config.model_config is None:
            return
        from kvquant_vllm.vllm_plugin.calibration import ship_calibration

        ship_calibration(vllm_config)
        if not cache_config.user_specified_block_size:
            cache_config.block_size = DEFAULT_BLOCK_SIZE

    get_attn_backend_cls._kvquant = True
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform.check_and_update_config = classmethod(check_and_update_config)
