"""kvquant-vllm: KVQuant 2-4 bit KV caches for vLLM."""

from kvquant_vllm.quant import KVCodec, get_codec, method_names
from kvquant_vllm.quant.paged import bits_per_element

__version__ = "0.1.0"

__all__ = ["KVCodec", "bits_per_element", "get_codec", "method_names", "__version__"]
