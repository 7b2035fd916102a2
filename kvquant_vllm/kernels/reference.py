"""PyTorch references of paged attention: the contract that the Triton, CUDA and CPU kernels are tested against.

A request's chunk of query tokens sits at positions seq_len - query_len .. seq_len - 1 and attends causally over
the request's tokens 0 .. its own position; decode is the chunk of one token. Query head j reads kv head
j // (num_q_heads // num_kv_heads). Keys are dequantized pre-RoPE (position 0 from the sink of the sequence's
first page when ``store.sink``) and rotated by ``rope`` (float64 angles). Softmax in float32. Values and outputs
are in the basis the pages hold values in (see :mod:`kvquant_vllm.quant.pagestore`), as the kernels' are.
"""

from __future__ import annotations

import torch

from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import Rope


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query [q, Hq, D] at the last q of n positions; key, value [n, H, D] (key post-RoPE) -> [q, Hq, D] float32."""
    q, n = query.shape[0], key.shape[0]
    group = query.shape[1] // key.shape[1]
    key, value = key.float().repeat_interleave(group, dim=1), value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,nhd->hqn", query.float(), key) * scale
    causal = torch.arange(n)[None, :] > torch.arange(n - q, n)[:, None]
    probs = scores.masked_fill(causal.to(scores.device), float("-inf")).softmax(dim=-1)
    return torch.einsum("hqn,nhd->qhd", probs, value)


def sequence_keys_values(
    cache: torch.Tensor, blocks: torch.Tensor, length: int, store: PagedKVQuant,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens 0 .. length - 1 of the sequence held by pages ``blocks``: pre-RoPE keys and values [length, H, D]
    float32, the sink in place."""
    h, d = store.layout.num_kv_heads, store.layout.head_dim
    key, value = (x.reshape(-1, h, d)[:length] for x in store.load(cache, blocks))
    if store.sink and length:
        key[0], value[0] = store.sinks(cache, blocks[:1])[0]
    return key, value


def paged_attention_reference(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, store: PagedKVQuant, rope: Rope, scale: float,
) -> torch.Tensor:
    """Causal attention of each request's chunk over its kvquant pages.

    query: [num_tokens, num_q_heads, D] post-RoPE, the requests' chunks one after the other; cache: [num_blocks, ...]
    uint8 pages of ``store``'s layout; block_table: [num_reqs, max_blocks]; query_start_loc: [num_reqs + 1];
    seq_lens: [num_reqs] (context + chunk). Returns [num_tokens, num_q_heads, D] float32.
    """
    bs = store.layout.block_size
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for i, n in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        key, value = sequence_keys_values(cache, block_table[i, : -(-n // bs)].long(), n, store)
        key = rope.rotate(key, torch.arange(n, device=query.device))
        out[start:end] = _attend(query[start:end], key, value, scale)
    return out


def paged_decode_reference(
    query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    store: PagedKVQuant, rope: Rope, scale: float,
) -> torch.Tensor:
    """One decode token per sequence, at position seq_len - 1: query [num_seqs, num_q_heads, D]; other arguments
    as :func:`paged_attention_reference`. Returns [num_seqs, num_q_heads, D] float32 (zeros for empty sequences)."""
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    live = (seq_lens > 0).nonzero().squeeze(1)
    query_start_loc = torch.arange(len(live) + 1, device=query.device)
    out[live] = paged_attention_reference(query[live], cache, block_table[live], query_start_loc, seq_lens[live],
                                          store, rope, scale)
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
        out[i] = _attend(query[i][None], key_cache[blocks].reshape(-1, h, d)[:n],
                         value_cache[blocks].reshape(-1, h, d)[:n], scale)[0]
    return out
