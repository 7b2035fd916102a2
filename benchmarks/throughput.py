"""Offline vLLM throughput and KV capacity for several --kv-cache-dtype values in one run.

Every dtype gets the same prompts (random token ids from --seed), lengths, request count and KV
memory budget; writes results/NAME.{json,md} with requests/s, output tokens/s, the engine's KV
capacity in tokens and bits per element, one table per prompt shape (--configs). Ratios are against
the first dtype of --dtypes. The load average of the machine before each engine is recorded.

    python -P benchmarks/throughput.py --dtypes auto,kvquant3 --configs 256x64x32,1024x128x32

(-P keeps benchmarks/ off sys.path: its kernels.py would shadow the `kernels` package that
transformers probes for.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from kvquant_vllm.engine import kv_capacity_tokens, shutdown
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import resolve_model
from kvquant_vllm.quant.paged import DTYPE_BITS, bits_per_element

RESULTS = Path(__file__).parent / "results"
DENSE_BITS = {"auto": 16.0, "bfloat16": 16.0, "float16": 16.0, "fp8": 8.0, "fp8_e4m3": 8.0, "fp8_e5m2": 8.0}


def run_dtype(model_dir: str, dtype: str, prompts: list[list[int]], output_len: int, args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"additional_config": {"kvquant_calibration": args.calibration}} if args.calibration else {}
    load = os.getloadavg()[0]
    llm = LLM(model=model_dir, kv_cache_dtype=dtype, dtype="bfloat16", enforce_eager=True, seed=args.seed,
              max_model_len=len(prompts[0]) + output_len, **extra)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        hf = llm.llm_engine.vllm_config.model_config.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        llm.generate(requests[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(requests, params)
        elapsed = time.perf_counter() - start
        capacity = kv_capacity_tokens(llm)
    finally:
        shutdown(llm)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    bits = (bits_per_element(dtype, head_dim, cache.block_size, hf.num_key_value_heads)
            if dtype in DTYPE_BITS else DENSE_BITS.get(dtype, float("nan")))
    return {
        "dtype": dtype,
        "load_average": load,
        "block_size": cache.block_size,
        "kv_capacity_tokens": capacity,
        "bits_per_element": bits,
        "requests_per_s": len(outputs) / elapsed,
        "output_tokens_per_s": generated / elapsed,
        "elapsed_s": elapsed,
    }


def parse_config(text: str) -> tuple[int, int, int]:
    """'INPUTxOUTPUTxPROMPTS' -> (input_len, output_len, num_prompts)."""
    try:
        input_len, output_len, num_prompts = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a config is INPUTxOUTPUTxPROMPTS, e.g. 256x64x32, got {text!r}") from None
    return input_len, output_len, num_prompts


def table(run: dict) -> list[str]:
    rows = run["results"]
    base = rows[0]
    lines = [
        f"### input {run['input_len']} / output {run['output_len']} x {run['num_prompts']} prompts "
        f"(max_model_len {run['input_len'] + run['output_len']})",
        "",
        "| kv cache dtype | bits/elem | block | KV capacity (tokens) | capacity ratio | requests/s | output tok/s "
        "| speed ratio | load before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['bits_per_element']:.2f} | {r['block_size']} | {r['kv_capacity_tokens']:,} "
            f"| {r['kv_capacity_tokens'] / base['kv_capacity_tokens']:.2f}x | {r['requests_per_s']:.3f} "
            f"| {r['output_tokens_per_s']:.1f} | {r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x "
            f"| {r['load_average']:.2f} |"
        )
    return lines


def to_markdown(runs: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# vLLM offline throughput and KV capacity",
        "",
        f"Model `{args.model}` (bf16 weights), prompts of random tokens (seed {args.seed}), greedy, EOS ignored, KV "
        f"budget {args.kv_space_gib} GiB per engine (`VLLM_CPU_KVCACHE_SPACE`), on {platform.machine()} with "
        f"{torch.get_num_threads()} threads. Ratios against `{args.dtypes.split(',')[0]}` from the same run; "
        "`load before`: the machine's 1-minute load average when the engine started.",
        "",
        f"Command: `{command}`",
    ]
    for run in runs:
        lines += ["", *table(run)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="throughput-cpu")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="auto,kvquant3")
    p.add_argument("--configs", type=lambda s: [parse_config(c) for c in s.split(",")],
                   help="prompt shapes INPUTxOUTPUTxPROMPTS, comma separated (default: --input-len x --output-len x "
                        "--num-prompts)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-space-gib", type=int, default=1)
    p.add_argument("--allow-long-context", action="store_true",
                   help="let prompt + output exceed the model's trained context (VLLM_ALLOW_LONG_MAX_MODEL_LEN; "
                        "random prompts measure speed only)")
    p.add_argument("--calibration", help="kvquant calibration file (default: MODEL_DIR/kvquant_calibration.safetensors)")
    p.add_argument("--notes", type=Path, help="markdown file appended under the table (the reading of it)")
    args = p.parse_args()

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gib)
    if args.allow_long_context:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    model_dir = str(resolve_model(args.model))
    runs = []
    for input_len, output_len, num_prompts in args.configs or [(args.input_len, args.output_len, args.num_prompts)]:
        g = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(100, 20000, (num_prompts, input_len), generator=g).tolist()
        rows = [run_dtype(model_dir, d, prompts, output_len, args) for d in args.dtypes.split(",")]
        runs.append({"input_len": input_len, "output_len": output_len, "num_prompts": num_prompts, "results": rows})
    command = "python -P " + shlex.join(["benchmarks/throughput.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    payload = {"command": command, "model": args.model, "seed": args.seed, "kv_space_gib": args.kv_space_gib,
               "runs": runs}
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(payload, indent=2) + "\n")
    markdown = to_markdown(runs, args, command) + (f"\n{args.notes.read_text()}" if args.notes else "")
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
