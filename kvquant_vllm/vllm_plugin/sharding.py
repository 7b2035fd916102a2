"""Which of the model's kv heads a tensor-parallel rank holds, as vLLM 0.32's ``QKVParallelLinear`` shards them.

With TP ranks and H kv heads, rank r holds heads [r * H/TP, (r + 1) * H/TP) when TP divides H; when TP >= H
vLLM replicates each head on TP/H consecutive ranks, so rank r holds head r // (TP/H). Pipeline parallelism
splits layers, not heads: a rank's layers are told by its layer names.
"""

from __future__ import annotations


def kv_head_shard(total_kv_heads: int, tp_rank: int, tp_size: int) -> range:
    """The kv heads (model indices) that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds."""
    if tp_size >= total_kv_heads:
        if tp_size % total_kv_heads:
            raise ValueError(f"tensor parallel size {tp_size} is not a multiple of the model's {total_kv_heads} "
                             "kv heads; use a size that divides them or that they divide")
        head = tp_rank // (tp_size // total_kv_heads)
        return range(head, head + 1)
    if total_kv_heads % tp_size:
        raise ValueError(f"the model's {total_kv_heads} kv heads do not split evenly over tensor parallel size "
                         f"{tp_size}; use a size that divides them or that they divide")
    per_rank = total_kv_heads // tp_size
    return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)


def local_kv_heads(total_kv_heads: int) -> range:
    """The kv heads of this worker's tensor-parallel rank (vLLM's parallel groups initialised, as in model code)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return kv_head_shard(total_kv_heads, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
