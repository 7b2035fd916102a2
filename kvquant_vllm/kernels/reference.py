"""PyTorch references of paged decode attention: the contract that the Triton and CUDA kernels are tested against.

One decode token per sequence, at position seq_len - 1, attends over the sequence's tokens 0 .. seq_len - 1
(itself included); query head j reads kv head j // (num_q_heads // num_kv_heads). Softmax in float32.
"""

from __future__ import annotations

import torch

from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import apply_rope, cos_sin_from_cache


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query [Hq, D]; key, value [n, H, D] (key post-RoPE) -> [Hq, D] float32."""
    group = query.shape[0] // key.shape[1]
    key, value = key.float().repeat_interleave(group, dim=1), value.float().repeat_interleave(group, dim=1)
    probs = (torch.einsum("hd,nhd->hn", query.float(), key) * scale).softmax(dim=-1)
    return torch.einsum("hn,nhd->hd", probs, value)


def paged_decode_reference(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, cos_sin_cache: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Decode attention over kvquant pages.

    query: [num_seqs, num_q_heads, D] post-RoPE; cache: [num_blocks, ...] uint8 pages of ``store``'s layout;
    block_table: [num_seqs, max_blocks] int32/int64; seq_lens: [num_seqs]; cos_sin_cache: [max_position, D]
    (cos half | sin half). Keys are dequantized pre-RoPE (position 0 from the sink of the sequence's first
    page when ``store.sink``) and rotated at their positions. Returns [num_seqs, num_q_heads, D] float32.
    """
    bs, h, d = store.layout.block_size, store.layout.num_kv_heads, store.layout.head_dim
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        blocks = block_table[i, : -(-n // bs)].long()
        key, value = (x.reshape(-1, h, d)[:n] for x in store.load(cache, blocks))
        if store.sink:
            key[0], value[0] = store.sinks(cache, blocks[:1])[0]
        key = apply_rope(key, *cos_sin_from_cache(cos_sin_cache, torch.arange(n, device=query.device)))
        out[i] = _attend(query[i], key, value, scale)
    return out


def paged_decode_fp16_reference(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Decode attention over plain pages: key_cache, value_cache [num_blocks, block_size, H, D] (keys post-RoPE);
    other arguments as :func:`paged_decode_reference`. Returns [num_seqs, num_q_heads, D] float32."""
    bs, h, d = key_cache.shape[1:]
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        blocks = block_table[i, : -(-n // bs)].long()
        out[i] = _attend(query[i], key_cache[blocks].reshape(-1, h, d)[:n], value_cache[blocks].reshape(-1, h, d)[:n],
                         scale)
    return out
