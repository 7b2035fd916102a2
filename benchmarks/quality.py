"""Perplexity of KV cache methods on one model and text; writes results/NAME.{json,md}.

    python benchmarks/quality.py --name quality-baselines --model smollm2-135m --text pydoc \\
        --methods int8-token,int4-token,int3-token,int2-token,int4-channel,int3-channel
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvquant_vllm.eval.perplexity import format_table, run_ppl
from kvquant_vllm.fsutil import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results file stem under benchmarks/results/")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default="pydoc")
    p.add_argument("--methods", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--title", default="KV cache quantization: perplexity")
    args = p.parse_args()

    report = run_ppl(args.model, args.methods.split(","), args.seq_len, args.max_windows, text=args.text)
    command = "python " + shlex.join(["benchmarks/quality.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", report.to_json(command))
    ordered = sorted(report.results, key=lambda r: -r.bits_per_element)
    markdown = (
        f"# {args.title}\n\n"
        f"Model `{args.model}` (fp32 weights and activations, KV cache fake-quantized at the k_proj/v_proj outputs, "
        f"keys pre-RoPE). Text `{args.text}`: {report.windows} non-overlapping windows of {report.seq_len} tokens. "
        f"The unquantized row (`fp16`, a 16-bit cache) is measured in the same run.\n\n"
        f"Command: `{command}`\n\n{format_table(ordered)}\n"
    )
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
