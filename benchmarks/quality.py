"""Perplexity of KV cache methods on one model and text; writes results/NAME.{json,md}.

    python benchmarks/quality.py --name quality-baselines --model smollm2-135m --text pydoc \\
        --methods int8-token,int4-token,int3-token,int2-token,int4-channel,int3-channel

With ``--calibrate-on SOURCE`` every calibration that the calibrated methods need (kvquant, cq,
skvq, wkvquant) is made first (activations collected once, layers calibrated as Ray tasks) on SOURCE,
which should not overlap ``--text`` (e.g. ``--calibrate-on pydoc:train --text pydoc:test``).
With ``--plot`` a PNG of perplexity delta against bits per element is written beside the table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvquant_vllm.calib.run import cached_calibrations
from kvquant_vllm.eval.perplexity import PplResult, format_table, run_ppl
from kvquant_vllm.fsutil import atomic_path, atomic_write_text
from kvquant_vllm.quant.registry import calibration_spec, needs_calibration

RESULTS = Path(__file__).resolve().parent / "results"


def calibrate_for(methods: list[str], args: argparse.Namespace) -> list[Path]:
    """Calibration files for every spec that ``methods`` need (made in one collection pass where missing)."""
    specs = [calibration_spec(m) for m in methods if needs_calibration(m)]
    return list(cached_calibrations(args.model, specs, args.calibrate_on, args.calib_samples, args.seq_len,
                                    args.num_workers).values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results file stem under benchmarks/results/")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default="pydoc")
    p.add_argument("--methods", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--title", default="KV cache quantization: perplexity")
    p.add_argument("--calibrate-on", help="text source to calibrate the calibrated methods on")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2, help="Ray workers for calibration")
    p.add_argument("--notes", type=Path, help="markdown file appended under the table (the reading of it)")
    p.add_argument("--plot", action="store_true", help="also write NAME.png: delta vs bits per element")
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
            f"Calibrated methods calibrated on `{args.calibrate_on}` ({args.calib_samples} x {args.seq_len} tokens), "
            f"disjoint from the evaluation text.\n\n"
            if args.calibrate_on
            else ""
        )
        + f"Command: `{command}`\n\n{format_table(ordered)}\n"
        + (f"\n![perplexity delta vs bits per element]({args.name}.png)\n" if args.plot else "")
        + (f"\n{args.notes.read_text()}" if args.notes else "")
    )
    if args.plot:
        plot(report.results, RESULTS / f"{args.name}.png", f"{args.title} ({args.model}, {args.text})")
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


def plot(results: list[PplResult], path: Path, title: str) -> None:
    """One labelled point per quantized method: perplexity delta (symlog) against bits per element."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in results:
        if r.method == "fp16":
            continue
        ax.scatter(r.bits_per_element, r.delta, s=18)
        ax.annotate(r.method, (r.bits_per_element, r.delta), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("bits per element (K and V, side data included)")
    ax.set_ylabel("perplexity delta vs 16-bit cache (symlog)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
