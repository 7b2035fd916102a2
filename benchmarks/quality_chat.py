"""Chat quality of KV cache methods: greedy agreement with the 16-bit cache and answer perplexity; writes
results/NAME.{json,md}.

    python benchmarks/quality_chat.py --name quality-chat --model smollm2-135m \\
        --methods int4-token,kvquant4,kvquant3,kvquant2,kivi2,kivi4 \\
        --calibrations pydoc:train,pydoc:train+chat:train

The unquantized model answers the built-in chat prompts (kvquant_vllm.chat: documentation topics that no
calibration text contains, and the demo's questions) greedily, once; every method then scores those answers
teacher-forced (kvquant_vllm.eval.agreement). Calibrated methods are evaluated once per calibration text, each
calibrated on it (--calib-samples x --seq-len tokens), so a row names its calibration.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from kvquant_vllm.calib.file import read_calibration
from kvquant_vllm.calib.run import cached_calibrations
from kvquant_vllm.chat import chat_prompts
from kvquant_vllm.eval.agreement import AgreementReport, evaluate_agreement, greedy_answers
from kvquant_vllm.eval.perplexity import load_eval_model
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import resolve_model
from kvquant_vllm.quant.geometry import attention_geometry
from kvquant_vllm.quant.registry import calibration_spec, check_method, needs_calibration

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results file stem under benchmarks/results/")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", required=True)
    p.add_argument("--calibrations", default="pydoc:train+chat:train",
                   help="comma-separated calibration texts for the calibrated methods")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--num-workers", type=int, default=2, help="Ray workers for calibration")
    p.add_argument("--title", default="KV cache methods on chat answers: greedy agreement with the 16-bit cache")
    p.add_argument("--notes", type=Path, help="markdown file appended under the table (the reading of it)")
    args = p.parse_args()

    methods = args.methods.split(",")
    for m in methods:
        check_method(m)
    calibrated = [m for m in methods if needs_calibration(m)]
    files = {text: cached_calibrations(args.model, [calibration_spec(m) for m in calibrated], text,
                                       args.calib_samples, args.seq_len, args.num_workers)
             for text in args.calibrations.split(",")} if calibrated else {}

    model, tokenizer = load_eval_model(resolve_model(args.model))
    geometry = attention_geometry(model.config)
    prompts = chat_prompts("test")[: args.max_prompts]
    answers = greedy_answers(model, tokenizer, prompts, args.max_new_tokens)
    results = evaluate_agreement(model, answers, [m for m in methods if m not in calibrated])
    for text, paths in files.items():
        calibrations = [read_calibration(path, geometry) for path in paths.values()]
        for r in evaluate_agreement(model, answers, calibrated, calibrations)[1:]:
            r.method = f"{r.method} [{text}]"
            results.append(r)
    report = AgreementReport(args.model, "built-in: pydoc test topics and the demo's questions", args.max_new_tokens,
                             len(prompts), results)

    command = "python " + shlex.join(["benchmarks/quality_chat.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    payload = json.loads(report.to_json(command))
    # File names only: the calibrations lie in the machine's cache (kvquant_vllm.models.cache_dir), not the repository.
    payload["calibration"] = {"samples": args.calib_samples, "seq_len": args.seq_len,
                              "files": {t: {str(s): Path(p).name for s, p in paths.items()} for t, paths in files.items()}}
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(payload, indent=2) + "\n")
    report.results = sorted(results, key=lambda r: (-r.bits_per_element, r.method))
    markdown = (
        f"# {args.title}\n\n"
        f"Model `{args.model}` (fp32 weights and activations, KV cache fake-quantized at the k_proj/v_proj outputs, "
        f"keys pre-RoPE). {report.describe()}: {sum(r.answer_tokens for r in results[:1])} answer tokens. "
        f"Agreement: the share of answer tokens whose argmax with the method's cache is the 16-bit answer's token; "
        f"answer ppl: perplexity of the 16-bit answers. Calibrated rows name their calibration text "
        f"({args.calib_samples} x {args.seq_len} tokens); no calibration text contains the prompts' topics. Bits per "
        f"element at the mean prompt + answer length.\n\n"
        f"Command: `{command}`\n\n{report.table()}\n"
        + (f"\n{args.notes.read_text()}" if args.notes else "")
    )
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
