"""Make vLLM accept ``kvquant2/3/4`` wherever it accepts a KV cache dtype.

vLLM keeps its KV cache dtypes in a ``Literal`` (``CacheDType``) that pydantic validates and
argparse turns into ``--kv-cache-dtype`` choices, and in ``STR_DTYPE_TO_TORCH_DTYPE``; it has no
registry, so the plugin extends both in place. Pages are raw bytes: torch dtype uint8.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from kvquant_vllm.quant.paged import DTYPE_BITS

KVQUANT_DTYPES = tuple(DTYPE_BITS)


def is_kvquant_dtype(dtype: str | None) -> bool:
    return dtype in DTYPE_BITS


def add_cache_dtypes() -> None:
    import pydantic
    import vllm.config.cache as cache_module
    import vllm.engine.arg_utils as arg_utils
    import vllm.v1.attention.selector as selector
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    for name in KVQUANT_DTYPES:
        STR_DTYPE_TO_TORCH_DTYPE[name] = torch.uint8
    known = get_args(cache_module.CacheDType)
    if all(name in known for name in KVQUANT_DTYPES):  # patched vLLM, or registered already
        return
    extended = Literal[known + tuple(n for n in KVQUANT_DTYPES if n not in known)]  # type: ignore[valid-type]
    cache_module.CacheDType = extended
    cache_module.CacheConfig.__annotations__["cache_dtype"] = extended
    cache_module.CacheConfig.__dataclass_fields__["cache_dtype"].type = extended
    pydantic.dataclasses.rebuild_dataclass(cache_module.CacheConfig, force=True)
    selector.CacheDType = extended
    arg_utils._compute_kwargs.cache_clear()  # argparse choices are derived from the Literal, memoised
