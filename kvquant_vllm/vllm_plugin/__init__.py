"""vLLM integration, loaded by vLLM through the ``vllm.general_plugins`` entry point.

``register()`` adds the ``kvquant2/3/4`` KV cache dtypes and routes the attention of layers with
those dtypes to :class:`~kvquant_vllm.vllm_plugin.backend.KVQuantAttentionBackend`.
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

    add_cache_dtypes()
    route_attention()
    skip_calibration_file()
    _registered = True
