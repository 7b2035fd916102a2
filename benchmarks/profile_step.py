"""Where the time of one vLLM decode step goes: torch.profiler in the engine's worker (vLLM's own profiler hook) over
one iteration after the prompts are prefilled, for each --kv-cache-dtype.

The batch is --num-prompts prompts of --input-len random tokens; the profiled iteration is a decode step of all
of them (the iterations before it prefill the prompts in vLLM's steps of max_num_batched_tokens, then decode a few
tokens). Writes results/NAME.md with, per dtype, the step's wall time and the operators that take the most of it
(self CPU time, vLLM's key_averages table), and the raw traces to --trace-dir.

    python -P benchmarks/profile_step.py --dtypes auto,kvquant3 --num-prompts 32 --input-len 1024
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from kvquant_vllm.engine import shutdown
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import resolve_model

RESULTS = Path(__file__).parent / "results"
DECODE_STEPS_BEFORE = 4  # decode steps between the last prefill and the profiled one


def profile_dtype(model_dir: str, dtype: str, args: argparse.Namespace, trace_dir: Path) -> str:
    """vLLM's key_averages table of one decode step with ``dtype``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out = trace_dir / dtype
    out.mkdir(parents=True, exist_ok=True)
    extra = {"additional_config": {"kvquant_calibration": args.calibration}} if args.calibration else {}
    llm = LLM(model=model_dir, kv_cache_dtype=dtype, dtype="bfloat16", enforce_eager=True, seed=0,
              max_model_len=args.input_len + 64, enable_prefix_caching=False,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(out.resolve()),
                               "torch_profiler_with_stack": False}, **extra)
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [TokensPrompt(prompt_token_ids=p)
                   for p in torch.randint(100, 20000, (args.num_prompts, args.input_len), generator=g).tolist()]
        batched = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        prefill_steps = math.ceil(args.num_prompts * args.input_len / batched)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        llm.start_profile(delay_iterations=prefill_steps + DECODE_STEPS_BEFORE, max_iterations=1)
        llm.generate(prompts, SamplingParams(max_tokens=prefill_steps + DECODE_STEPS_BEFORE + 8, ignore_eos=True),
                     use_tqdm=False)
        llm.stop_profile()
    finally:
        shutdown(llm)
    tables = sorted(out.glob("*.profiler_out.txt"))
    if not tables:
        raise RuntimeError(f"vLLM wrote no profiler table under {out}")
    return tables[-1].read_text()


def top_rows(table: str, rows: int) -> str:
    """The header and the first ``rows`` operators of a key_averages table, its total line kept."""
    lines = [line for line in table.splitlines() if line.strip()]
    header = [i for i, line in enumerate(lines) if re.match(r"^-+", line)]
    body_start = header[1] + 1 if len(header) > 1 else 0
    total = [line for line in lines if line.startswith("Self CPU time total")]
    return "\n".join(lines[: body_start] + lines[body_start: body_start + rows] + total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="profile-step-cpu")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="auto,kvquant3")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=18, help="operators listed per dtype")
    p.add_argument("--kv-space-gib", type=int, default=1)
    p.add_argument("--calibration", help="kvquant calibration file (default: MODEL_DIR/kvquant_calibration.safetensors)")
    p.add_argument("--trace-dir", type=Path, help="where the traces go (default: a temporary directory)")
    args = p.parse_args()

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gib)
    model_dir = str(resolve_model(args.model))
    trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="kvquant-profile-"))
    command = "python -P " + shlex.join(["benchmarks/profile_step.py", *sys.argv[1:]])
    sections = [
        "# One decode step, profiled",
        "",
        f"Model `{args.model}` (bf16 weights), a decode step of {args.num_prompts} requests with "
        f"{args.input_len}-token prompts (random tokens), {torch.get_num_threads()} threads, torch.profiler through "
        "vLLM's profiler hook in the worker, CPU activities; self CPU time per operator (vLLM's key_averages table, "
        "first rows).",
        "",
        f"Command: `{command}`",
    ]
    for dtype in args.dtypes.split(","):
        table = profile_dtype(model_dir, dtype, args, trace_dir)
        sections += ["", f"## {dtype}", "", "```", top_rows(table, args.rows), "```"]
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(sections) + "\n")
    print("\n".join(sections))


if __name__ == "__main__":
    main()
