"""Perplexity of KV cache methods on one model and text; writes results/NAME.{json,md}.

    python benchmarks/quality.py --name quality-baselines --model smollm2-135m --text pydoc \\
        --methods int8-token,int4-token,int3-token,int2-token,int4-channel,int3-channel

With ``--calibrate-on SOURCE`` every calibration that the kvquant methods need is made first
(activations collected once, layers calibrated as Ray tasks) on SOURCE, which should not overlap
``--text`` (e.g. ``--calibrate-on pydoc:train --text pydoc:test``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvquant_vllm.calib.run import calibrate_model
from kvquant_vllm.eval.perplexity import format_table, run_ppl
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import cache_dir
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.quant.registry import needs_calibration

RESULTS = Path(__file__).resolve().parent / "results"


def calibrate_for(methods: list[str], args: argparse.Namespace) -> list[Path]:
    """Calibration files for every spec that ``methods`` need, made in one collection pass."""
    specs = {kvquant_methods()[m].spec for m in methods if needs_calibration(m)}
    folder = cache_dir() / "calibrations" / args.model
    outs = {
        spec: folder / f"{args.calibrate_on.replace(':', '-')}-{args.calib_samples}x{args.seq_len}-"
        f"{spec.calibrate_flags().replace('--', '').replace(' ', '')}.safetensors"
        for spec in sorted(specs, key=str)
    }
    return calibrate_model(
        args.model, outs, text=args.calibrate_on, samples=args.calib_samples, seq_len=args.seq_len,
        num_workers=args.num_workers,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results file stem under benchmarks/results/")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default="pydoc")
    p.add_argument("--methods", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--title", default="KV cache quantization: perplexity")
    p.add_argument("--calibrate-on", help="text source to calibrate the kvquant methods on")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2, help="Ray workers for calibration")
    p.add_argument("--notes", type=Path, help="markdown file appended under the table (the reading of it)")
    args = p.parse_args()

    methods = args.methods.split(",")
    calibration_files = calibrate_for(methods, args) if args.calibrate_on else []
    report = run_ppl(args.model, methods, args.seq_len, args.max_windows, args.text, None, calibration_files)
    command = "python " + shlex.join(["benchmarks/quality.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", report.to_json(command))
    ordered = sorted(report.results, key=lambda r: -r.bits_per_element)
    markdown = (
        f"# {args.title}\n\n"
        f"Model `{args.model}` (fp32 weights and activations, KV cache fake-quantized at the k_proj/v_proj outputs, "
        f"keys pre-RoPE). Text `{args.text}`: {report.windows} non-overlapping windows of {report.seq_len} tokens. "
        f"The unquantized row (`fp16`, a 16-bit cache) is measured in the same run.\n\n"
        + (
            f"kvquant methods calibrated on `{args.calibrate_on}` ({args.calib_samples} x {args.seq_len} tokens), "
            f"disjoint from the evaluation text.\n\n"
            if args.calibrate_on
            else ""
        )
        + f"Command: `{command}`\n\n{format_table(ordered)}\n"
        + (f"\n{args.notes.read_text()}" if args.notes else "")
    )
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
