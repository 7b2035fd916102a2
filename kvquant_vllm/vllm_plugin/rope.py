"""The served model's RoPE as inverse frequencies, recovered from vLLM's rotary embedding and checked against it."""

from __future__ import annotations

import functools
import inspect
import json

import torch
from vllm.model_executor.layers.rotary_embedding import get_rope

from kvquant_vllm.quant.geometry import UnsupportedModelError
from kvquant_vllm.quant.rope import Rope

CHECKED_POSITIONS = 64


def rope_of(rotary) -> Rope:
    """:class:`Rope` of a vLLM rotary embedding (plain, llama3, YaRN, ... : every kind whose cos/sin table is
    cos and sin of position x inverse frequency, times one factor). UnsupportedModelError for any other kind,
    or a partial rotation."""
    kind = type(rotary).__name__
    if getattr(rotary, "rotary_dim", rotary.head_size) != rotary.head_size:
        raise UnsupportedModelError(f"{kind} rotates {rotary.rotary_dim} of {rotary.head_size} channels; kvquant "
                                    "caches need RoPE over the whole head")
    # vLLM's classes compute their frequencies from the base, or (YaRN and its kin) from the scaling factor.
    argument = next(iter(inspect.signature(rotary._compute_inv_freq).parameters))
    inv_freq = rotary._compute_inv_freq(getattr(rotary, argument)).float().cpu()
    table = rotary.cos_sin_cache.float().cpu()  # [max_position, D]: cos half | sin half
    rope = Rope(inv_freq, float(table[0, 0]))  # cos(0) x the attention factor
    # float64: vLLM builds the model under the model's default dtype, and bf16 would round position 319 up to 320.
    positions = torch.linspace(0, len(table) - 1, CHECKED_POSITIONS, dtype=torch.float64).long()
    cos, sin = rope.cos_sin(positions)
    half = rotary.head_size // 2
    error = torch.maximum((cos[:, :half] - table[positions, :half]).abs(),
                          (sin[:, :half] - table[positions, half:]).abs()).amax(1)
    # vLLM's table rounds each angle to fp32 (an error of ~6e-8 x the angle); a wrong frequency is far off.
    allowed = 1e-5 + 1e-6 * positions.double() * float(inv_freq.max()) * rope.scaling
    if (error > allowed).any():
        raise UnsupportedModelError(f"{kind}: its cos/sin table is not cos and sin of position x inverse "
                                    "frequency, which the kvquant kernels compute; use another --kv-cache-dtype")
    return rope


@functools.cache
def _model_rope(head_size: int, max_position: int, rope_parameters: str) -> Rope:
    rotary = get_rope(head_size, max_position=max_position, rope_parameters=json.loads(rope_parameters) or None,
                      is_neox_style=True, dtype=torch.float32)
    return rope_of(rotary)


def check_built_rope(head_size: int) -> None:
    """Refuse, once the model is built, a RoPE that the kvquant caches cannot follow and that the model's config
    does not name: one that rotates the pairs (2i, 2i + 1) of a head (the interleaved, GPT-J style of Command-R or
    ERNIE 4.5 MoE; the stores and kernels pair channel i with i + D/2, as NeoX-style RoPE does), or multimodal
    M-RoPE (Qwen2-VL and its kin), whose positions after an image are not the token's index in the sequence, which
    the backend rotates by. Only the model's code passes these to vLLM's ``get_rope``, which keeps every rotary
    embedding it makes in one cache."""
    from vllm.model_executor.layers import rotary_embedding
    from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding

    for rotary in list(rotary_embedding._ROPE_DICT.values()):
        if rotary.head_size != head_size:
            continue  # another part's (a vision tower's), not the attention's
        if not rotary.is_neox_style:
            raise UnsupportedModelError(
                f"this model rotates interleaved channel pairs (GPT-J-style RoPE, {type(rotary).__name__} with "
                "is_neox_style=False); the kvquant caches need NeoX-style RoPE (channel i with i + head_dim / 2): "
                "use another --kv-cache-dtype"
            )
        if isinstance(rotary, MRotaryEmbedding):
            raise UnsupportedModelError(
                f"this model rotates by multimodal positions ({type(rotary).__name__}); the kvquant caches rotate "
                "keys by their index in the sequence: use another --kv-cache-dtype"
            )


def model_rope(model_config, head_size: int) -> Rope:
    """The RoPE of the model that ``model_config`` (vLLM's ModelConfig) serves, as its attention layers apply it."""
    parameters = getattr(model_config.hf_config, "rope_parameters", None) or {}
    return _model_rope(head_size, model_config.max_model_len, json.dumps(parameters, sort_keys=True))
