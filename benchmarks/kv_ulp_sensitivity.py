"""How far a float32 rounding difference in K/V carries through a KV-cache method: the fraction of cache
elements whose dequantized value moves by a quantization step (more than --step-fraction of the layer's largest
magnitude) when every pre-RoPE key and value is perturbed by relative noise of about one float32 ulp.

Two engines that compute K/V in different batch shapes differ by such roundings; an unquantized cache passes
them through unchanged, a quantized cache turns the ones next to a code boundary (or an outlier threshold)
into whole-step changes, which can flip a greedy near-tie.

    python benchmarks/kv_ulp_sensitivity.py --model smollm2-135m --method kvquant3 --tokens 512
"""

from __future__ import annotations

import argparse
import json

import torch

from kvquant_vllm.calib.run import cached_calibrations
from kvquant_vllm.calib.file import read_calibration
from kvquant_vllm.data import load_text
from kvquant_vllm.eval.perplexity import load_eval_model
from kvquant_vllm.models import resolve_model
from kvquant_vllm.quant.kvquant import KVQuantCodec, kvquant_methods

ULP = 2.0**-24


def projections(model: torch.nn.Module, ids: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Every layer's k_proj and v_proj outputs for ``ids`` [1, T]: (kind, layer) -> [T, H * D] float32."""
    acts: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for layer, block in enumerate(model.model.layers):
        for kind, proj in (("key", block.self_attn.k_proj), ("value", block.self_attn.v_proj)):
            hooks.append(proj.register_forward_hook(
                lambda _m, _i, out, key=(kind, layer): acts.__setitem__(key, out[0].detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return acts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="kvquant3", choices=sorted(kvquant_methods()))
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--text", default="pydoc:test")
    p.add_argument("--calibrate-on", default="pydoc:train+chat:train")
    p.add_argument("--step-fraction", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    options = kvquant_methods()[args.method]
    path = cached_calibrations(args.model, [options.spec], args.calibrate_on, samples=16, seq_len=2048)[options.spec]
    codec = KVQuantCodec(args.method, options, read_calibration(path))
    model, tokenizer = load_eval_model(resolve_model(args.model))
    ids = tokenizer(load_text(args.text), return_tensors="pt").input_ids[:, : args.tokens]
    heads, dim = codec.calibration.geometry.num_kv_heads, codec.calibration.geometry.head_dim
    moved = {"key": 0, "value": 0}
    total = {"key": 0, "value": 0}
    for (kind, layer), x in projections(model, ids).items():
        x = x.view(-1, heads, dim)[1:]  # the sink token stays in 16 bits at run time
        noisy = x * (1 + ULP * torch.randn_like(x))
        delta = (codec.fake_quant(x, kind, layer) - codec.fake_quant(noisy, kind, layer)).abs()
        moved[kind] += int((delta > args.step_fraction * x.abs().amax()).sum())
        total[kind] += x.numel()
    print(json.dumps({"method": args.method, "tokens": int(ids.shape[1]), "layers": len(model.model.layers),
                      **{f"{k}_elements": total[k] for k in total},
                      **{f"{k}_moved_fraction": moved[k] / total[k] for k in total}}))


if __name__ == "__main__":
    main()
