"""The ``kvquant-vllm`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kvquant_vllm.models import BUNDLED_MODELS, DEFAULT_MODEL


def _add_text_args(p: argparse.ArgumentParser, required: bool = True, text_help: str = "") -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--text", help=text_help or "text source: pydoc, wikitext2 or c4, optionally with :train/:test")
    src.add_argument("--text-file", help="a UTF-8 text file")


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from kvquant_vllm.models import prepare_model

    print(prepare_model(args.name, args.out))


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from kvquant_vllm.eval.perplexity import format_table, run_ppl
    from kvquant_vllm.fsutil import atomic_write_text

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run_ppl(
        args.model, methods, args.seq_len, args.max_windows, args.text, args.text_file, args.calibration or []
    )
    print(report.describe())
    print(format_table(report.results))
    if args.json:
        atomic_write_text(args.json, report.to_json(" ".join(["kvquant-vllm", *sys.argv[1:]])))


def cmd_eval_agreement(args: argparse.Namespace) -> None:
    from kvquant_vllm.eval.agreement import run_agreement
    from kvquant_vllm.fsutil import atomic_write_text

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run_agreement(args.model, methods, args.prompts_file, args.calibration or [], args.max_new_tokens,
                           args.max_prompts)
    print(report.describe())
    print(report.table())
    if args.json:
        atomic_write_text(args.json, report.to_json(" ".join(["kvquant-vllm", *sys.argv[1:]])))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from kvquant_vllm.calib.run import calibrate_model
    from kvquant_vllm.quant.kvquant import CalibrationSpec
    from kvquant_vllm.quant.registry import calibration_spec

    if args.method:
        spec = calibration_spec(args.method)
    else:
        spec = CalibrationSpec(
            bits=args.bits,
            outlier_fraction=args.outliers,
            fisher=not args.no_fisher,
            key_position="post-rope" if args.post_rope else "pre-rope",
            key_granularity="token" if args.per_token_keys else "channel",
            value_outliers=args.value_outliers,
            outlier_allocation="even" if args.even_outliers else "fisher",
            key_threshold_share=args.key_threshold_share,
            value_rotation=not args.no_value_rotation,
            # Per-token keys share one normalised space across channels: one codebook per layer.
            key_books="layer" if args.layer_key_books or args.per_token_keys else "channel",
        )
    (path,) = calibrate_model(
        args.model,
        {spec: args.out},
        text=args.text,
        text_file=args.text_file,
        samples=args.samples,
        seq_len=args.seq_len,
        num_workers=args.num_workers,
        ray_address=args.ray_address,
    )
    print(path)


def cmd_patch_vllm(args: argparse.Namespace) -> None:
    from kvquant_vllm.patching import patch_vllm

    action = "check" if args.check else "revert" if args.revert else "apply"
    lines = patch_vllm(action)
    print("\n".join(lines))
    if args.check and any("NOT applied" in line for line in lines):
        raise SystemExit(1)


def cmd_demo(args: argparse.Namespace) -> None:
    from kvquant_vllm.demo import run_demo

    run_demo(args.model)


def build_parser() -> argparse.ArgumentParser:
    from kvquant_vllm.quant.kvquant import KEY_THRESHOLD_SHARE

    parser = argparse.ArgumentParser(prog="kvquant-vllm", description="KVQuant KV cache quantization for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="materialise a bundled model as a safetensors directory")
    p.add_argument("name", choices=sorted(BUNDLED_MODELS))
    p.add_argument("--out", help="output directory (default: $KVQUANT_CACHE/models/NAME)")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("eval", help="quality evaluation")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser("ppl", help="perplexity with the KV cache fake-quantized by each method")
    p.add_argument("--model", required=True, help="local Hugging Face model directory or bundled model name")
    _add_text_args(p)
    p.add_argument("--methods", required=True, help="comma-separated, e.g. fp16,int4-token,int3-token")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument(
        "--calibration",
        action="append",
        help="calibration file for the kvquant methods (repeatable: each method takes the one made for it)",
    )
    p.set_defaults(func=cmd_eval_ppl)

    p = eval_sub.add_parser("agreement", help="greedy agreement with the 16-bit cache on chat answers")
    p.add_argument("--model", required=True, help="local Hugging Face model directory or bundled model name")
    p.add_argument("--methods", required=True, help="comma-separated, e.g. kvquant3,kvquant4")
    p.add_argument("--prompts-file", help="one user prompt per line (default: the built-in 120 prompts)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the 16-bit greedy answers")
    p.add_argument("--max-prompts", type=int, help="the first N prompts only")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--calibration", action="append", help="calibration file (repeatable), as for eval ppl")
    p.set_defaults(func=cmd_eval_agreement)

    p = sub.add_parser("calibrate", help="calibrate KVQuant (or another method) for a model (Ray job)")
    p.add_argument("model", help="local Hugging Face model directory or bundled model name")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bits", type=int, choices=(2, 3, 4), help="KVQuant bits")
    what.add_argument("--method", help="the calibration that this method needs, e.g. kvquant3, cq2, skvq-k2v1.5")
    p.add_argument("--outliers", type=float, default=0.01, help="fraction of elements kept as sparse outliers")
    _add_text_args(p, required=False, text_help=(
        "calibration text: a source (pydoc:train, wikitext2:train, ...), chat:train (conversations in the model's "
        "chat template), or several joined by + (default: pydoc:train+chat:train for models with a chat "
        "template, else pydoc:train)"))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ray-address", help="Ray cluster to run the per-layer tasks on (default: a local one)")
    p.add_argument(
        "--num-workers", type=int, default=os.cpu_count() or 1, help="local Ray CPUs; 0 calibrates in-process"
    )
    p.add_argument("--out", help="output file (default: MODEL_DIR/kvquant_calibration.safetensors)")
    ablation = p.add_argument_group("ablations")
    ablation.add_argument("--no-fisher", action="store_true", help="unweighted k-means codebooks")
    ablation.add_argument("--post-rope", action="store_true", help="quantize keys after RoPE")
    ablation.add_argument("--per-token-keys", action="store_true", help="keys per token instead of per channel")
    ablation.add_argument("--value-outliers", action="store_true", help="exact value outliers per vector (top-k)")
    ablation.add_argument("--no-value-rotation", action="store_true", help="quantize values in their own basis")
    ablation.add_argument("--layer-key-books", action="store_true",
                          help="one key codebook per layer (default: one per channel)")
    ablation.add_argument("--even-outliers", action="store_true",
                          help="the same key outlier fraction in every channel (default: shared by Fisher-weighted error)")
    ablation.add_argument("--key-threshold-share", type=float,
                          help="share of --outliers that the key thresholds leave out, the rest of the page lists "
                          "being headroom for text unlike the calibration text (default, by --bits: "
                          f"{', '.join(f'{s:g} at {b}' for b, s in KEY_THRESHOLD_SHARE.items())})")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("patch-vllm", help="let the stock vLLM CLI accept --kv-cache-dtype kvquant{2,3,4}")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 unless every patch is applied")
    group.add_argument("--revert", action="store_true", help="undo the patches")
    p.set_defaults(func=cmd_patch_vllm)

    p = sub.add_parser("demo", help="generate with vLLM and print a perplexity table")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kvquant-vllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
