"""The engine really serves the quantized model: vLLM's prompt-logprob perplexity against the
fake-quant harness's, same windows, same calibration, in one run.

For every dtype of --dtypes and every step size of --chunks, an fp32 vLLM engine computes prompt logprobs
of the windows (each window one prompt, prefilled in chunks of at most that many tokens), and the harness
(transformers, K/V fake-quantized at k_proj/v_proj) evaluates the matching method (``auto`` -> the 16-bit
``fp16`` row, ``kvquant3`` -> ``kvquant3``) on the same windows. Writes results/NAME.{json,md}.

A quantized model is chaotic: rounding-level differences in the keys (vLLM's and transformers' RoPE and
GEMMs differ by ~1e-6) flip codes near their midpoints, and the flips compound over the layers. So engine
and harness agree in perplexity only up to noise. To show its size, the harness is run again --noise-seeds
times with 1e-6 Gaussian noise added to the keys before quantization; the table gives that spread beside
the engine's difference.

    python benchmarks/engine_equality.py --model smollm2-135m --dtypes auto,kvquant3 --windows 16 \
        --seq-len 1024 --chunks 1024,128

kvquant dtypes use the calibration beside the weights (``MODEL_DIR/kvquant_calibration.safetensors``,
as the engine does) unless --calibration files are given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from kvquant_vllm.calib.file import default_calibration_path, read_calibration
from kvquant_vllm.data import load_text
from kvquant_vllm.engine import shutdown
from kvquant_vllm.eval.fakequant import tap_kv
from kvquant_vllm.eval.perplexity import evaluate_methods, load_eval_model, make_windows, tokenize, window_nll
from kvquant_vllm.eval.vllm_ppl import vllm_perplexity
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import resolve_model
from kvquant_vllm.quant.geometry import attention_geometry
from kvquant_vllm.quant.registry import calibration_spec, get_codec

RESULTS = Path(__file__).parent / "results"
KEY_NOISE = 1e-6


def harness_method(dtype: str) -> str:
    return "fp16" if dtype == "auto" else dtype


def engine_ppl(model_dir: str, dtype: str, windows: torch.Tensor, calibration: Path | None, chunk: int) -> float:
    from vllm import LLM

    extra = {"additional_config": {"kvquant_calibration": str(calibration)}} if calibration else {}
    llm = LLM(model=model_dir, kv_cache_dtype=dtype, dtype="float32", enforce_eager=True, seed=0,
              max_model_len=windows.shape[1] + 1, max_num_batched_tokens=chunk, **extra)
    try:
        return vllm_perplexity(llm, windows)
    finally:
        shutdown(llm)


@contextmanager
def key_noise(model: torch.nn.Module, seed: int):
    """Within the block, every layer's pre-RoPE keys get KEY_NOISE x standard Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    handles = tap_kv(model, lambda kind, layer, x: x + KEY_NOISE * torch.randn(x.shape, generator=gen)
                     if kind == "key" else None)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def noisy_harness_ppls(model, windows: torch.Tensor, method: str, calibrations: list, seeds: int) -> list[float]:
    codec = get_codec(method, calibrations, attention_geometry(model.config))
    ppls = []
    for seed in range(1, seeds + 1):
        with key_noise(model, seed):
            nll, count = window_nll(model, windows, codec, desc=f"{method}, key noise seed {seed}")
        ppls.append(math.exp(nll / count))
    return ppls


def to_markdown(payload: dict) -> str:
    lines = ["| kv cache dtype | calibrated on | harness method | max tokens per step | harness ppl | engine ppl "
             "| engine - harness | harness under 1e-6 key noise | tokens |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in payload["results"]:
        spread = (f"{100 * min(r['noisy_relative']):+.2f} % .. {100 * max(r['noisy_relative']):+.2f} %"
                  if r["noisy_relative"] else "-")
        lines.append(f"| {r['dtype']} | {r['calibration']} | {r['harness_method']} | {r['chunk']} "
                     f"| {r['harness_ppl']:.4f} | {r['engine_ppl']:.4f} | {100 * r['relative_difference']:+.3f} % "
                     f"| {spread} | {r['tokens']} |")
    return (
        "# Engine vs fake-quant harness: perplexity\n\n"
        f"Model `{payload['model']}` in fp32 on both sides. Text `{payload['text']}`: {payload['windows']} windows "
        f"of {payload['seq_len']} tokens, each sent to vLLM as one prompt (prompt logprobs) and prefilled in "
        f"chunks of at most the step size. The harness fake-quantizes K/V at the k_proj/v_proj outputs with the "
        f"same calibration and the engine's block size (key outlier lists per 256-token page). The last column "
        f"but one: the harness run again with 1e-6 Gaussian noise on the keys ({payload['noise_seeds']} seeds), "
        f"relative to its plain run: the size of the differences that rounding alone makes in a quantized "
        f"model. All numbers come from the same run.\n\nCommand: `{payload['command']}`\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="engine-equality")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="auto,kvquant3")
    p.add_argument("--calibration", action="append", default=[], help="calibration files for the kvquant dtypes")
    p.add_argument("--text", default="pydoc:test")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--chunks", default="1024,128", help="max tokens scheduled per engine step, one engine each")
    p.add_argument("--noise-seeds", type=int, default=3, help="harness re-runs with 1e-6 key noise, per kvquant dtype")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    dtypes, chunks = args.dtypes.split(","), [int(c) for c in args.chunks.split(",")]
    model_dir = str(resolve_model(args.model))
    model, tokenizer = load_eval_model(model_dir)
    geometry = attention_geometry(model.config)
    files = args.calibration or ([default_calibration_path(model_dir)] if args.dtypes != "auto" else [])
    calibrations = {Path(f): read_calibration(f, geometry) for f in files}
    windows = make_windows(tokenize(tokenizer, load_text(args.text)), args.seq_len, args.windows)
    harness = {r.method: r for r in evaluate_methods(model, windows, [harness_method(d) for d in dtypes],
                                                     list(calibrations.values()))}
    noisy = {d: noisy_harness_ppls(model, windows, d, list(calibrations.values()), args.noise_seeds)
             for d in dtypes if d != "auto"}
    del model
    rows = []
    for dtype, chunk in tqdm([(d, c) for d in dtypes for c in chunks], desc="engines"):
        path = None
        if dtype != "auto":
            spec = calibration_spec(dtype)
            path = next((f for f, c in calibrations.items() if c.spec == spec), None)
            if path is None:
                raise SystemExit(f"{dtype} needs --calibration with `{spec.calibrate_flags()}`")
        ppl = engine_ppl(model_dir, dtype, windows, path, chunk)
        ref = harness[harness_method(dtype)]
        info = calibrations[path].info if path else {}
        made_on = f"{info.get('text', '?')}, {info.get('samples', '?')} x {info.get('seq_len', '?')}" if path else "-"
        rows.append({"dtype": dtype, "chunk": chunk, "harness_method": ref.method, "harness_ppl": ref.ppl,
                     "engine_ppl": ppl, "relative_difference": ppl / ref.ppl - 1, "tokens": ref.tokens,
                     "calibration": made_on, "noisy_relative": [q / ref.ppl - 1 for q in noisy.get(dtype, [])]})

    payload = {"command": "python " + shlex.join(["benchmarks/engine_equality.py", *sys.argv[1:]]),
               "model": args.model, "text": args.text, "windows": int(windows.shape[0]), "seq_len": args.seq_len,
               "noise_seeds": args.noise_seeds, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(payload, indent=2) + "\n")
    markdown = to_markdown(payload)
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
