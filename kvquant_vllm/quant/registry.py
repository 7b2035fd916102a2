"""Method names -> codecs.

Every method the harness (and later the vLLM backend) accepts is listed here, so that
an unknown name fails in one place with the list of known ones.
"""

from __future__ import annotations

from typing import Callable

from kvquant_vllm.quant.codec import KVCodec, Unquantized
from kvquant_vllm.quant.intn import INT_BITS, IntChannelCodec, IntTokenCodec

CodecFactory = Callable[[], KVCodec]

_FACTORIES: dict[str, CodecFactory] = {"fp16": Unquantized}
for _b in INT_BITS:
    _FACTORIES[f"int{_b}-token"] = lambda b=_b: IntTokenCodec(b)
    _FACTORIES[f"int{_b}-channel"] = lambda b=_b: IntChannelCodec(b)


def method_names() -> list[str]:
    """Every known method name, in registration order."""
    return list(_FACTORIES)


def get_codec(name: str) -> KVCodec:
    """The codec for ``name``; ValueError listing the known names if there is none."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache method {name!r}; known methods: {', '.join(method_names())}") from None
    return factory()
