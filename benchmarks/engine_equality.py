"""The engine really serves the quantized model: vLLM's prompt-logprob perplexity against the
fake-quant harness's, same windows, same calibration, in one run.

For every dtype of --dtypes, an fp32 vLLM engine computes prompt logprobs of the windows and the
harness (transformers, K/V fake-quantized at k_proj/v_proj) evaluates the matching method
(``auto`` -> the 16-bit ``fp16`` row, ``kvquant3`` -> ``kvquant3``) on the same windows. Prompts
longer than --chunk tokens are prefilled in chunks. Writes results/NAME.{json,md}.

    python benchmarks/engine_equality.py --model smollm2-135m --dtypes auto,kvquant3 --windows 4 --seq-len 1024

kvquant dtypes use the calibration beside the weights (``MODEL_DIR/kvquant_calibration.safetensors``,
as the engine does) unless --calibration files are given.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from kvquant_vllm.calib.file import default_calibration_path, read_calibration
from kvquant_vllm.data import load_text
from kvquant_vllm.engine import shutdown
from kvquant_vllm.eval.perplexity import evaluate_methods, load_eval_model, make_windows, tokenize
from kvquant_vllm.eval.vllm_ppl import vllm_perplexity
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import resolve_model
from kvquant_vllm.quant.geometry import attention_geometry
from kvquant_vllm.quant.registry import calibration_spec

RESULTS = Path(__file__).parent / "results"


def harness_method(dtype: str) -> str:
    return "fp16" if dtype == "auto" else dtype


def engine_ppl(model_dir: str, dtype: str, windows, calibration: Path | None, chunk: int) -> float:
    from vllm import LLM

    extra = {"additional_config": {"kvquant_calibration": str(calibration)}} if calibration else {}
    llm = LLM(model=model_dir, kv_cache_dtype=dtype, dtype="float32", enforce_eager=True, seed=0,
              max_model_len=windows.shape[1] + 1, max_num_batched_tokens=chunk, **extra)
    try:
        return vllm_perplexity(llm, windows)
    finally:
        shutdown(llm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="engine-equality")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="auto,kvquant3")
    p.add_argument("--calibration", action="append", default=[], help="calibration files for the kvquant dtypes")
    p.add_argument("--text", default="pydoc:test")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256, help="max tokens scheduled per engine step")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    dtypes = args.dtypes.split(",")
    model_dir = str(resolve_model(args.model))
    model, tokenizer = load_eval_model(model_dir)
    geometry = attention_geometry(model.config)
    files = args.calibration or ([default_calibration_path(model_dir)] if args.dtypes != "auto" else [])
    calibrations = {Path(f): read_calibration(f, geometry) for f in files}
    windows = make_windows(tokenize(tokenizer, load_text(args.text)), args.seq_len, args.windows)
    harness = {r.method: r for r in evaluate_methods(model, windows, [harness_method(d) for d in dtypes],
                                                     list(calibrations.values()))}
    del model
    rows = []
    for dtype in tqdm(dtypes, desc="engines"):
        path = None
        if dtype != "auto":
            spec = calibration_spec(dtype)
            path = next((f for f, c in calibrations.items() if c.spec == spec), None)
            if path is None:
                raise SystemExit(f"{dtype} needs --calibration with `{spec.calibrate_flags()}`")
        ppl = engine_ppl(model_dir, dtype, windows, path, args.chunk)
        ref = harness[harness_method(dtype)]
        info = calibrations[path].info if path else {}
        made_on = f"{info.get('text', '?')}, {info.get('samples', '?')} x {info.get('seq_len', '?')}" if path else "-"
        rows.append({"dtype": dtype, "harness_method": ref.method, "harness_ppl": ref.ppl, "engine_ppl": ppl,
                     "relative_difference": ppl / ref.ppl - 1, "tokens": ref.tokens, "calibration": made_on})

    command = "python " + shlex.join(["benchmarks/engine_equality.py", *sys.argv[1:]])
    payload = {"command": command, "model": args.model, "text": args.text, "windows": int(windows.shape[0]),
               "seq_len": args.seq_len, "chunk": args.chunk, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(payload, indent=2) + "\n")
    lines = ["| kv cache dtype | calibrated on | harness method | harness ppl | engine ppl | relative difference "
             "| tokens |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['calibration']} | {r['harness_method']} | {r['harness_ppl']:.4f} | {r['engine_ppl']:.4f} | "
                     f"{100 * r['relative_difference']:+.3f} % | {r['tokens']} |")
    markdown = (
        "# Engine vs fake-quant harness: perplexity\n\n"
        f"Model `{args.model}` in fp32 on both sides. Text `{args.text}`: {windows.shape[0]} windows of "
        f"{args.seq_len} tokens, each sent to vLLM as one prompt (prompt logprobs), prefilled in chunks of at "
        f"most {args.chunk} tokens. The harness fake-quantizes K/V at the k_proj/v_proj outputs with the same "
        f"calibration. Both columns come from the same run.\n\nCommand: `{command}`\n\n" + "\n".join(lines) + "\n"
    )
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
