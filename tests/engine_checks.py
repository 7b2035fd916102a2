"""A check that runs inside a vLLM worker (shipped there by ``LLM.apply_model``): every call of the kvquant
attention backend on chosen layers against an independent float64 reference.

The reference sees only what vLLM hands the backend (post-RoPE keys, values, queries, token positions)
and remembers each request's keys and values by the request's first block: it quantizes the request's
whole history with the whole-sequence codec (no pages, no block tables), re-applies RoPE and attends
causally. So it catches a wrong page, slot, position, mask, layer or calibration, and a cache that
is not really quantized, in chunked prefill, mixed prefill/decode batches and prefix-cache hits alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch


def install_attention_check(model: torch.nn.Module, layers: tuple[int, ...],
                            calibration_file: str | None = None) -> int:
    """Wrap the kvquant attention of ``layers`` (indices) in ``model``; returns how many were wrapped.

    With ``calibration_file`` the reference takes its tables from that file, for the kv heads that vLLM's
    QKVParallelLinear (the layer's ``qkv_proj``) loaded into this tensor-parallel rank, rather than from the
    backend: so it also catches a rank that quantizes with another head's tables."""
    from vllm.model_executor.models.utils import extract_layer_index

    from kvquant_vllm.calib.file import read_calibration
    from kvquant_vllm.vllm_plugin.backend import KVQuantAttentionImpl

    whole = read_calibration(calibration_file) if calibration_file else None
    wrapped = 0
    for name, module in model.named_modules():
        impl = getattr(module, "impl", None)
        if isinstance(impl, KVQuantAttentionImpl) and extract_layer_index(name) in layers:
            heads = range(impl.num_kv_heads)
            calibration = impl.calibration
            if whole is not None:
                qkv = model.get_submodule(name.rsplit(".", 1)[0]).qkv_proj
                first = qkv.tp_rank // qkv.num_kv_head_replicas * qkv.num_kv_heads  # vLLM's k_proj shard
                heads = range(first, first + qkv.num_kv_heads)
                calibration = whole.kv_heads(heads)
            impl.forward = _checked(impl, impl.forward, extract_layer_index(name), calibration)
            impl.check_report = {"layer": extract_layer_index(name), "kv_heads": (heads.start, heads.stop), "calls": 0,
                                 "mixed_calls": 0, "tokens": 0, "skipped": 0, "max_abs_err": 0.0, "max_abs_out": 0.0,
                                 "kernels": set()}
            wrapped += 1
    return wrapped


def attention_check_reports(model: torch.nn.Module) -> list[dict]:
    return [m.impl.check_report for m in model.modules() if hasattr(getattr(m, "impl", None), "check_report")]


def _checked(impl, forward, layer_index: int, calibration):
    from kvquant_vllm.quant.kvquant import KVQuantCodec, kvquant_methods
    from kvquant_vllm.quant.rope import invert_rope

    options = kvquant_methods()[impl.kv_cache_dtype]
    codec = KVQuantCodec(impl.kv_cache_dtype, replace(options, block_size=impl.block_size), calibration)
    history: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # first block -> position -> (k, v)

    def checked(layer, query, key, value, kv_cache, m, output, *args, **kwargs):
        result = forward(layer, query, key, value, kv_cache, m, output, *args, **kwargs)
        if m is None:
            return result
        report = impl.check_report
        report["calls"] += 1
        report["kernels"].add(impl.kernels)
        report["mixed_calls"] += 0 < m.num_decodes < len(m.query_lens)  # decodes beside prefill chunks
        h, d = impl.num_kv_heads, impl.head_size
        qsl = m.query_start_loc.tolist()
        for i in range(len(qsl) - 1):
            start, end = qsl[i], qsl[i + 1]
            positions = m.positions[start:end]
            cos, sin = impl.rope.cos_sin(positions)
            k_pre = invert_rope(key[start:end].float().view(-1, h, d), cos, sin) * impl.rope.inverse_gain
            seen = history.setdefault(int(m.block_table[i, 0]), {})
            for j, p in enumerate(positions.tolist()):
                seen[p] = (k_pre[j], value[start + j].float().view(h, d))
            length = int(m.seq_lens[i])
            if any(p not in seen for p in range(length)):
                report["skipped"] += end - start
                continue
            keys = torch.stack([seen[p][0] for p in range(length)])
            values = torch.stack([seen[p][1] for p in range(length)])
            all_pos = torch.arange(length, device=keys.device)
            keys = impl.rope.rotate(codec.fake_quant(keys, "key", layer_index), all_pos).double()
            values = codec.fake_quant(values, "value", layer_index).double()
            q = query[start:end].double().view(end - start, -1, d)
            group = q.shape[1] // h
            scores = torch.einsum("qhd,khd->hqk", q, keys.repeat_interleave(group, 1)) * impl.scale
            scores = scores.masked_fill(all_pos[None, None, :] > positions[None, :, None], float("-inf"))
            expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.repeat_interleave(group, 1))
            got = result[start:end].double().view_as(expected)
            report["tokens"] += end - start
            report["max_abs_err"] = max(report["max_abs_err"], float((got - expected).abs().max()))
            report["max_abs_out"] = max(report["max_abs_out"], float(expected.abs().max()))
        return result

    return checked


def remove_attention_check(model: torch.nn.Module) -> None:
    for m in model.modules():
        impl = getattr(m, "impl", None)
        if hasattr(impl, "check_report"):
            del impl.forward, impl.check_report  # the class's forward again


def use_kernels(model: torch.nn.Module, kernels: str, layers: tuple[int, ...]) -> None:
    """Switch the kvquant attention of ``layers`` to the ``kernels`` path ('torch', 'triton', 'cpu')."""
    from vllm.model_executor.models.utils import extract_layer_index

    for name, m in model.named_modules():
        impl = getattr(m, "impl", None)
        if hasattr(impl, "kernels") and extract_layer_index(name) in layers:
            impl.kernels = kernels
