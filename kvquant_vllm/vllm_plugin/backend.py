"""The kvquant attention backend for vLLM: builder + metadata + impl.

Every forward first writes the step's new tokens into the quantized pages (RoPE undone with each
token's position, KVQuant-quantized with the layer's calibration), then reads every token of every
request back from the pages (the current chunk included), dequantizes, re-applies RoPE and attends.
So what vLLM returns (tokens, logprobs, prompt logprobs) is the quantized model's.

The PyTorch path does all of it on any device. With ``KVQUANT_KERNELS`` selecting kernels (see
:mod:`kvquant_vllm.kernels`), the batch's decode requests (vLLM puts them first) and its prefill chunks
attend straight from the packed pages: on a GPU the store is the Triton kernel, decodes run the Triton or
CUDA paged decode kernel and prefill chunks the Triton paged prefill kernel; on a CPU the C++ CPU kernels
store and attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvquant_vllm.kernels import kernel_backend
from kvquant_vllm.quant.paged import DTYPE_BITS, PageLayout, dtype_layout
from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import apply_rope, invert_rope
from kvquant_vllm.vllm_plugin.calibration import SUPPORTED_HEAD_DIMS, rank_calibration
from kvquant_vllm.vllm_plugin.rope import check_built_rope, model_rope


class KVQuantAttentionBackend(AttentionBackend):
    """Base of the three kvquant backends; ``bits`` picks the page layout."""

    bits: ClassVar[int] = 3
    accept_output_buffer: bool = True
    # The store needs the token positions that only the metadata carries, so it happens in forward.
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(DTYPE_BITS)

    @classmethod
    def get_name(cls) -> str:
        return f"KVQUANT{cls.bits}"

    @staticmethod
    def get_impl_cls() -> type[KVQuantAttentionImpl]:
        return KVQuantAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVQuantMetadataBuilder]:
        return KVQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def page_layout(cls, spec: AttentionSpec) -> PageLayout:
        return dtype_layout(f"kvquant{cls.bits}", spec.block_size, spec.num_kv_heads, spec.head_size)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        # One head slot of ceil(page / block_size) bytes per token: vLLM's page is then our page
        # (plus < block_size bytes of rounding), and its capacity in tokens is the true one.
        page = cls.page_layout(spec).page_size_bytes
        return replace(spec, num_head_slots=1, state_content_bytes=math.ceil(page / spec.block_size))


class KVQuant2AttentionBackend(KVQuantAttentionBackend):
    bits = 2


class KVQuant3AttentionBackend(KVQuantAttentionBackend):
    bits = 3


class KVQuant4AttentionBackend(KVQuantAttentionBackend):
    bits = 4


@dataclass
class KVQuantMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int64
    query_lens: torch.Tensor  # [num_reqs] int64
    seq_lens: torch.Tensor  # [num_reqs] int64, context + this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks] int64, the columns that hold max_seq_len
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, negative for padding
    positions: torch.Tensor  # [num_actual_tokens] int64
    max_query_len: int  # an upper bound
    max_seq_len: int  # an upper bound
    num_decodes: int  # the first requests, one query token each
    rope_cos: torch.Tensor  # [num_actual_tokens, D] float32: the model's RoPE at the tokens' positions
    rope_sin: torch.Tensor
    prefill_work: torch.Tensor | None  # [blocks, 2] int32: the Triton prefill kernel's schedule of the others

    def split(self) -> tuple[KVQuantMetadata | None, KVQuantMetadata | None]:
        """(the decode requests, the others): each as metadata of its own, None where there are none."""
        d, r = self.num_decodes, len(self.query_lens)
        decodes = others = None
        if d:  # one token each: request i's token is token i
            decodes = replace(self, num_actual_tokens=d, query_start_loc=self.query_start_loc[: d + 1],
                              query_lens=self.query_lens[:d], seq_lens=self.seq_lens[:d],
                              block_table=self.block_table[:d], slot_mapping=self.slot_mapping[:d],
                              positions=self.positions[:d], max_query_len=1, rope_cos=self.rope_cos[:d],
                              rope_sin=self.rope_sin[:d], prefill_work=None)
        if d < r:
            others = replace(self, num_actual_tokens=self.num_actual_tokens - d,
                             query_start_loc=self.query_start_loc[d:] - d, query_lens=self.query_lens[d:],
                             seq_lens=self.seq_lens[d:], block_table=self.block_table[d:],
                             slot_mapping=self.slot_mapping[d:], positions=self.positions[d:], num_decodes=0,
                             rope_cos=self.rope_cos[d:], rope_sin=self.rope_sin[d:])
        return decodes, others


class KVQuantMetadataBuilder(AttentionMetadataBuilder[KVQuantMetadata]):
    def __init__(
        self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self._init_reorder_batch_threshold(1)  # decodes first: they go to the paged decode kernel
        self.rope = model_rope(vllm_config.model_config, kv_cache_spec.head_size).to(device)
        self.kernels = kernel_backend(device.type)
        if self.kernels in ("triton", "cuda"):
            from kvquant_vllm.kernels.triton_attention import prefill_block

            num_q_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
            self.prefill_block = prefill_block(num_q_heads, kv_cache_spec.num_kv_heads)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KVQuantMetadata:
        cm = common_attn_metadata
        n, r = cm.num_actual_tokens, cm.num_reqs
        qsl = cm.query_start_loc[: r + 1].long()
        query_lens = qsl[1:] - qsl[:-1]
        seq_lens = cm.seq_lens[:r].long()
        # Position of token i of request j: the request's context length plus i's place in its chunk.
        req = torch.repeat_interleave(torch.arange(r, device=qsl.device), query_lens)
        positions = (seq_lens - query_lens)[req] + torch.arange(len(req), device=qsl.device) - qsl[:-1][req]
        positions = F.pad(positions, (0, n - len(req)))
        slots = cm.slot_mapping[:n].long().clone()
        slots[len(req):] = -1
        max_blocks = math.ceil(cm.max_seq_len / self.block_size)
        num_decodes, _, _, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        rope_cos, rope_sin = self.rope.cos_sin(positions)  # once per step, for every layer's store
        prefill_work = None
        if self.kernels in ("triton", "cuda") and num_decodes < r:
            from kvquant_vllm.kernels.triton_attention import prefill_work as schedule

            others = cm.query_start_loc_cpu[num_decodes : r + 1]
            prefill_work = schedule(others - others[0], self.prefill_block).to(qsl.device)
        return KVQuantMetadata(
            num_actual_tokens=n,
            query_start_loc=qsl,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_table=cm.block_table_tensor[:r, :max_blocks].long(),
            slot_mapping=slots,
            positions=positions,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            num_decodes=num_decodes,
            rope_cos=rope_cos,
            rope_sin=rope_sin,
            prefill_work=prefill_work,
        )


class KVQuantAttentionImpl(AttentionImpl[KVQuantMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "kvquant3",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "attention sinks (learned)": sinks is not None,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            f"{attn_type} attention": attn_type != AttentionType.DECODER,
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} does not support {names}; use another dtype")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        config = get_current_vllm_config()
        model = config.model_config
        # The tables of the kv heads this tensor-parallel rank holds: its pages hold those heads only.
        self.calibration = rank_calibration(kv_cache_dtype, config, self.num_kv_heads)
        # The model's own RoPE, as inverse frequencies (an unsupported kind fails here, before allocation).
        self.rope = model_rope(model, head_size)
        self.block_size = config.cache_config.block_size
        # 'torch', 'triton', 'cuda' or 'cpu': decided (and a bad KVQUANT_KERNELS refused) before the engine allocates.
        self.kernels = kernel_backend(config.device_config.device_type)
        # Built on first forward, when the layer index and the device are known.
        self.store: PagedKVQuant | None = None
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # the PyTorch path's cos, sin per position

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # The model is built by now, and so are its rotary embeddings, which its config does not describe in full.
        check_built_rope(self.head_size)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVQuantMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, H, D] (key post-RoPE), kv_cache [num_blocks, 1, block_size, C] uint8."""
        if attn_metadata is None:  # profiling run
            return output
        if self.store is None:
            index = extract_layer_index(layer.layer_name)
            self.store = PagedKVQuant(self.kv_cache_dtype, self.calibration, index, self.block_size).to(query.device)
            self.rope = self.rope.to(query.device)
        m = attn_metadata
        n = m.num_actual_tokens
        value = self.store.rotate_values(value[:n])
        if self.kernels == "torch":
            key_pre_rope = invert_rope(key[:n].float(), m.rope_cos, m.rope_sin) * self.rope.inverse_gain
            self.store.store(kv_cache, key_pre_rope, value, m.slot_mapping, m.positions)
        else:
            if self.kernels == "cpu":
                from kvquant_vllm.kernels.cpu import store_tokens
            else:
                from kvquant_vllm.kernels.triton_store import store_tokens

            store_tokens(kv_cache, key[:n], value, m.slot_mapping, m.positions, self.store, m.rope_cos,
                         m.rope_sin, self.rope.inverse_gain)
        # The kernels attend over the pages' rotated values; their outputs are rotated back here.
        unrotate = self.store.unrotate
        if self.kernels == "torch":
            output[:n] = unrotate(self._attend(kv_cache, query[:n], m)).to(output.dtype)
            return output
        decodes, others = m.split()
        if decodes is not None:
            d = decodes.num_actual_tokens
            output[:d] = unrotate(self._decode(kv_cache, query[:d], decodes)).to(output.dtype)
        if others is not None:
            chunks = self._prefill(kv_cache, query[m.num_decodes : n], others)
            output[m.num_decodes : n] = unrotate(chunks).to(output.dtype)
        return output

    def _decode(self, cache: torch.Tensor, query: torch.Tensor, m: KVQuantMetadata) -> torch.Tensor:
        """Decode requests (one query token each) with the paged decode kernel: [num_reqs, Hq, D]."""
        if self.kernels == "cpu":
            from kvquant_vllm.kernels import cpu

            return cpu.paged_decode_attention(query, cache, m.block_table, m.seq_lens, self.store, self.rope,
                                              self.scale)
        if self.kernels == "cuda":
            from kvquant_vllm.kernels import cuda

            return cuda.paged_decode_attention(query, cache, m.block_table.int(), m.seq_lens.int(), self.store,
                                               self.rope, self.scale, max_seq_len=m.max_seq_len)
        from kvquant_vllm.kernels.triton_attention import paged_decode_attention

        return paged_decode_attention(query, cache, m.block_table, m.seq_lens, self.store, self.rope, self.scale)

    def _prefill(self, cache: torch.Tensor, query: torch.Tensor, m: KVQuantMetadata) -> torch.Tensor:
        """Prefill chunks (the requests after the decodes) with the paged prefill kernel: [num_tokens, Hq, D]."""
        if self.kernels == "cpu":
            from kvquant_vllm.kernels import cpu

            return cpu.paged_prefill_attention(query, cache, m.block_table, m.query_start_loc, m.seq_lens, self.store,
                                               self.rope, self.scale)
        from kvquant_vllm.kernels.triton_attention import paged_prefill_attention

        return paged_prefill_attention(query, cache, m.block_table, m.query_start_loc, m.seq_lens, self.store,
                                       self.rope, self.scale, work=m.prefill_work)

    def _rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D] float32 at positions 0 .. length - 1, computed once for the longest length seen."""
        if self.rope_table is None or self.rope_table[0].shape[0] < length:
            self.rope_table = self.rope.cos_sin(torch.arange(length, device=self.rope.inv_freq.device))
        return self.rope_table[0][:length], self.rope_table[1][:length]

    def _attend(self, cache: torch.Tensor, query: torch.Tensor, m: KVQuantMetadata) -> torch.Tensor:
        """Attention of every query token over its request's dequantized cache: [T, Hq, D] float32.

        Decode requests and prefill chunks attend apart: padded together, each decode's single query would be
        padded to the step's longest chunk (beside a 2,000-token chunk, 60 decodes did 60 chunks' attention)."""
        decodes, others = m.split()
        if decodes is None or others is None:
            return self._attend_padded(cache, query, m)
        d = m.num_decodes
        return torch.cat([self._attend_padded(cache, query[:d], decodes), self._attend_padded(cache, query[d:], others)])

    def _attend_padded(self, cache: torch.Tensor, query: torch.Tensor, m: KVQuantMetadata) -> torch.Tensor:
        """:meth:`_attend` with queries and keys padded to the requests' longest; each page that the requests
        use is dequantized once, so the work is bounded by the live pages, not by requests x the longest."""
        r, bs, h, d = len(m.seq_lens), self.block_size, self.num_kv_heads, self.head_size
        nb = math.ceil(int(m.seq_lens.max()) / bs)
        used = torch.arange(nb, device=query.device)[None, :] < ((m.seq_lens + bs - 1) // bs)[:, None]  # [r, nb]
        pages, where = m.block_table[:, :nb][used].unique(return_inverse=True)
        page_keys, page_values = self.store.load(cache, pages)  # [P, bs, H, D]
        keys, values = (x.new_zeros(r, nb, bs, h, d) for x in (page_keys, page_values))
        keys[used], values[used] = page_keys[where], page_values[where]
        keys, values = keys.view(r, nb * bs, h, d), values.view(r, nb * bs, h, d)
        if self.store.sink:
            sink = self.store.sinks(cache, m.block_table[:, 0])  # [r, 2, H, D]
            keys[:, 0], values[:, 0] = sink[:, 0], sink[:, 1]
        length = keys.shape[1]
        cos, sin = self._rope_table(length)
        keys = apply_rope(keys.reshape(r * length, self.num_kv_heads, self.head_size),
                          cos.repeat(r, 1), sin.repeat(r, 1)).view(r, length, self.num_kv_heads, self.head_size)

        # Queries padded to [r, longest query]; key j is visible to query i of request b iff
        # j <= (seq_len - query_len) + i.
        q_idx = torch.arange(int(m.query_lens.max()), device=query.device)
        valid_q = q_idx[None, :] < m.query_lens[:, None]
        flat = (m.query_start_loc[:-1, None] + q_idx[None, :]).clamp(max=max(query.shape[0] - 1, 0))
        q = query.float()[flat] * valid_q[..., None, None]  # [r, Q, Hq, D]
        limit = (m.seq_lens - m.query_lens)[:, None] + q_idx[None, :]
        visible = torch.arange(length, device=query.device)[None, None, :] <= limit[..., None]  # [r, Q, L]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=visible[:, None], scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)  # [r, Q, Hq, D]
        result = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        result[flat[valid_q]] = out[valid_q]
        return result
