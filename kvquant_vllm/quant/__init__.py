"""KV cache quantization numerics: pure PyTorch, no vLLM."""

from kvquant_vllm.quant.codec import KVCodec, Unquantized
from kvquant_vllm.quant.packing import pack_codes, packed_numel, unpack_codes
from kvquant_vllm.quant.registry import get_codec, method_names

__all__ = ["KVCodec", "Unquantized", "get_codec", "method_names", "pack_codes", "packed_numel", "unpack_codes"]
