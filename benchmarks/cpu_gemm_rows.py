"""Whether vLLM's CPU float32 GEMM gives a token's row the same bits whatever the number of rows M in the call:
the oneDNN matmul that vLLM's CPU linear layers run (``dispatch_cpu_unquantized_gemm``: ``ops.create_onednn_mm``
and ``ops.onednn_mm``), for every projection shape of a model, a row computed alone (M = 1) and in calls of
M = 2 .. --max-rows rows.

An offline engine generating one prompt alone decodes with M = 1; a server decodes several requests per step.
Where the M = 1 row differs, the hidden states, and from the next layer on the K and V, of the same token differ
by roundings between the two (see benchmarks/kv_ulp_sensitivity.py for what such roundings do to a quantized
cache). Weights are random of the model's shapes: oneDNN picks its kernel from the shapes, not the values.

    python benchmarks/cpu_gemm_rows.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoConfig

from kvquant_vllm.models import resolve_model

ROW_COUNTS = (2, 3, 4, 7, 8, 16, 17, 64, 256, 1000)


def projection_shapes(model: str) -> dict[str, tuple[int, int]]:
    """name -> (N outputs, K inputs) of each linear layer of a decoder block, and the LM head."""
    cfg = AutoConfig.from_pretrained(resolve_model(model))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    return {"qkv_proj": (qkv, cfg.hidden_size), "o_proj": (cfg.hidden_size, cfg.num_attention_heads * head_dim),
            "gate_up_proj": (2 * cfg.intermediate_size, cfg.hidden_size),
            "down_proj": (cfg.hidden_size, cfg.intermediate_size), "lm_head": (cfg.vocab_size, cfg.hidden_size)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=8, help="rows compared per call")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(args.seed)
    for name, (n, k) in projection_shapes(args.model).items():
        handler = ops.create_onednn_mm((torch.randn(n, k, generator=gen) / k**0.5).t(), 32)
        x = torch.randn(max(ROW_COUNTS), k, generator=gen)
        alone = torch.cat([ops.onednn_mm(handler, x[i : i + 1], None) for i in range(args.rows)])  # M = 1 each
        largest = ops.onednn_mm(handler, x, None)[: args.rows]
        differ_alone, differ_largest, worst = {}, 0, 0.0
        for m in ROW_COUNTS:
            r = min(m, args.rows)
            out = ops.onednn_mm(handler, x[:m], None)[:r]
            differ_alone[m] = int((out != alone[:r]).any(-1).sum())
            differ_largest += int((out != largest[:r]).any(-1).sum())
            worst = max(worst, float(((out - alone[:r]).abs().amax(-1) / out.abs().amax(-1)).max()))
        print(json.dumps({
            "layer": name, "N": n, "K": k,
            "rows_differing_from_m1": differ_alone,  # per M: of its first min(M, --rows) rows
            "max_difference_from_m1_over_row_max": worst,
            "rows_differing_between_calls_of_m_ge_2": differ_largest,
        }), flush=True)


if __name__ == "__main__":
    main()
