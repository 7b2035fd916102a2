"""kvquant caches across tensor- and pipeline-parallel ranks: the same numbers as one rank, the same capacity per rank.

For every parallel layout of --layouts (``tp1`` the reference; ``tp3``: 3 tensor-parallel ranks; ``pp2``: 2
pipeline stages; ``tp3-ray``: 3 tensor-parallel ranks on vLLM's Ray executor) and every dtype of --dtypes, an
fp32 vLLM engine computes prompt logprobs of the windows (perplexity, each window one prompt) and greedy
continuations of the first --prompt-len tokens of each window; a bf16 `auto` engine of each layout is started
for its capacity only (the 16-bit cache that the capacity ratio is quoted against). Writes
results/NAME.{json,md}: per layout and dtype the perplexity and its difference to tp1, the positions at which its
argmax on the text is tp1's, the greedy continuations that differ from tp1's (where they part, and how near a tie
it was there), and the per-rank KV capacity (vLLM's count, the smallest over ranks) with
its ratio to `auto` of the same layout.

The band that the differences are read against is measured in the same run, on the same text: the tp1 engine of
each dtype computes the windows again --noise-seeds times with the output of every row-parallel layer (the sums that
tensor parallelism splits over ranks) multiplied by 1 + --noise x N(0, 1), a few float32 ulps: as much as the
rounding of TP's split reductions changes a one-rank engine (see
:func:`kvquant_vllm.eval.engine_compare.perturb_reductions`).

    python -P benchmarks/parallel.py --model smollm2-135m --calibration CAL --windows 16 --seq-len 1024 \
        --notes benchmarks/notes/parallel-cpu.md

(``-P``: not this directory on the import path, where kernels.py would stand in for the ``kernels`` package that
transformers looks for.)

Ranks share this machine's cores (``VLLM_CPU_OMP_THREADS_BIND``, one entry per rank); the Ray layouts run
on a local Ray cluster with a CPU per rank, which vLLM's engine process joins through RAY_ADDRESS. The harness's
kvquant3 perplexity under 1e-6 key noise (results/engine-equality.json) is quoted beside the measured band.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvquant_vllm.calib.file import default_calibration_path, read_calibration
from kvquant_vllm.data import load_text
from kvquant_vllm.engine import kv_capacity_tokens, shutdown
from kvquant_vllm.eval.engine_compare import (argmax_agreement, first_divergence, greedy_with_logprobs,
                                              perturb_reductions, prompt_nll_and_argmax)
from kvquant_vllm.eval.perplexity import make_windows, tokenize
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import resolve_model

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Layout:
    name: str
    threads: str  # VLLM_CPU_OMP_THREADS_BIND: one CPU list per rank
    engine_args: dict = field(default_factory=dict)

    @property
    def ranks(self) -> int:
        return self.engine_args.get("tensor_parallel_size", 1) * self.engine_args.get("pipeline_parallel_size", 1)


LAYOUTS = {layout.name: layout for layout in [
    Layout("tp1", "auto"),
    Layout("tp3", "0|1|0", {"tensor_parallel_size": 3}),
    Layout("pp2", "0|1", {"pipeline_parallel_size": 2}),
    Layout("tp3-ray", "0|1|0", {"tensor_parallel_size": 3, "distributed_executor_backend": "ray"}),
]}


def engine(model_dir: str, layout: Layout, dtype: str, model_dtype: str, max_model_len: int, kv_bytes: int,
           calibration: str | None):
    from vllm import LLM

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = layout.threads
    extra = {"additional_config": {"kvquant_calibration": calibration}} if calibration and dtype != "auto" else {}
    # No prefix caching: tp1 computes the same windows again under rounding-sized noise, every token anew.
    return LLM(model=model_dir, kv_cache_dtype=dtype, dtype=model_dtype, enforce_eager=True, seed=0,
               max_model_len=max_model_len, max_num_batched_tokens=max_model_len, kv_cache_memory_bytes=kv_bytes,
               enable_prefix_caching=False, **layout.engine_args, **extra)


def measure(model_dir: str, layout: Layout, dtype: str, windows: torch.Tensor, args: argparse.Namespace) -> dict:
    """Perplexity and argmax tokens of ``windows``, greedy continuations (with their top-2 logprobs) and capacity of
    one fp32 engine; for tp1 also the perplexity and argmax tokens of the windows under rounding-sized noise, one
    pass per seed."""
    from vllm.inputs import TokensPrompt

    llm = engine(model_dir, layout, dtype, "float32", windows.shape[1] + 1, args.kv_cache_mib << 20, args.calibration)
    try:
        nll, count, argmax = prompt_nll_and_argmax(llm, windows)
        prompts = [TokensPrompt(prompt_token_ids=w[: args.prompt_len].tolist()) for w in windows]
        row = {"layout": layout.name, "dtype": dtype, "ranks": layout.ranks, "ppl": math.exp(nll / count),
               "tokens": count, "argmax": argmax, "greedy": greedy_with_logprobs(llm, prompts, args.new_tokens),
               "capacity_tokens": kv_capacity_tokens(llm)}
        if layout.name == "tp1":
            row["noisy"] = []
            for seed in range(1, args.noise_seeds + 1):
                llm.apply_model(functools.partial(perturb_reductions, seed=seed, relative=args.noise))
                nll, _, argmax = prompt_nll_and_argmax(llm, windows)
                row["noisy"].append({"seed": seed, "ppl": math.exp(nll / count), "argmax": argmax})
            llm.apply_model(functools.partial(perturb_reductions, seed=None, relative=args.noise))
        return row
    finally:
        shutdown(llm)


def bf16_capacity(model_dir: str, layout: Layout, max_model_len: int, kv_bytes: int) -> int:
    llm = engine(model_dir, layout, "auto", "bfloat16", max_model_len, kv_bytes, None)
    try:
        return kv_capacity_tokens(llm)
    finally:
        shutdown(llm)


def compare(rows: list[dict], auto_bf16: dict[str, int]) -> None:
    """Add each row's differences to tp1 of its dtype and its capacity ratios to `auto` of its layout."""
    reference = {r["dtype"]: r for r in rows if r["layout"] == "tp1"}
    auto_fp32 = {r["layout"]: r["capacity_tokens"] for r in rows if r["dtype"] == "auto"}
    for r in rows:
        ref = reference[r["dtype"]]
        r["ppl_vs_tp1"] = r["ppl"] / ref["ppl"] - 1
        r["argmax_agreement_with_tp1"] = argmax_agreement(r["argmax"], ref["argmax"])
        parted = [d for (tokens, _), reference in zip(r["greedy"], ref["greedy"])
                  if (d := first_divergence(tokens, *reference))]
        r["greedy_differ_fraction"] = len(parted) / len(r["greedy"])
        r["greedy_first_divergence"] = parted  # (step, nats by which tp1 preferred its own token there)
        r["capacity_vs_auto_bf16"] = r["capacity_tokens"] / auto_bf16[r["layout"]]
        for noisy in r.get("noisy", []):  # tp1 against itself under rounding-sized noise
            noisy["ppl_vs_tp1"] = noisy["ppl"] / r["ppl"] - 1
            noisy["argmax_agreement_with_tp1"] = argmax_agreement(noisy.pop("argmax"), r["argmax"])
        if r["layout"] in auto_fp32:
            r["capacity_vs_auto_fp32"] = r["capacity_tokens"] / auto_fp32[r["layout"]]


def noise_band(path: Path) -> str:
    """The harness's kvquant3 perplexity under 1e-6 key noise relative to its plain run, from engine-equality."""
    if not path.is_file():
        return "not measured"
    rows = json.loads(path.read_text())["results"]
    noisy = [x for r in rows if r["dtype"] == "kvquant3" for x in r["noisy_relative"]]
    return f"{100 * min(noisy):+.2f} % .. {100 * max(noisy):+.2f} %" if noisy else "not measured"


def to_markdown(payload: dict) -> str:
    lines = ["| layout | ranks | kv cache dtype | ppl | ppl vs tp1 | argmax on the text = tp1's "
             "| greedy continuations that differ from tp1 | where they part (step, tp1's margin in nats) "
             "| KV capacity per rank (tokens) | vs auto bf16 | vs auto fp32 |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in payload["results"]:
        fp32 = f"{r['capacity_vs_auto_fp32']:.2f}x" if "capacity_vs_auto_fp32" in r else "-"
        parted = ", ".join(f"{step} ({gap:.3f})" for step, gap in r["greedy_first_divergence"]) or "-"
        lines.append(f"| {r['layout']} | {r['ranks']} | {r['dtype']} | {r['ppl']:.4f} | {100 * r['ppl_vs_tp1']:+.3f} % "
                     f"| {100 * r['argmax_agreement_with_tp1']:.2f} % | {100 * r['greedy_differ_fraction']:.0f} % "
                     f"| {parted} | {r['capacity_tokens']:,} | {r['capacity_vs_auto_bf16']:.2f}x | {fp32} |")
    auto = ", ".join(f"{k} {v:,}" for k, v in payload["auto_bf16_capacity_tokens"].items())
    return (
        "# kvquant caches across tensor- and pipeline-parallel ranks (CPU)\n\n"
        f"Model `{payload['model']}` in fp32, kvquant3 calibration `{payload['calibration']}`, KV budget {payload['kv_cache_mib']} MiB per rank "
        f"(`kv_cache_memory_bytes`). Text `{payload['text']}`: {payload['windows']} windows of {payload['seq_len']} "
        f"tokens ({payload['tokens']} predicted tokens), each one prompt, prompt logprobs; the argmax column: the "
        "positions at which the engine's greedy token given the text so far is tp1's; greedy: the first "
        f"{payload['prompt_len']} tokens of each window continued by {payload['new_tokens']} tokens, and for those "
        "that differ from tp1's, the step where they part and by how much tp1 preferred its token there (a near "
        "tie that rounding decided; the quantized model is chaotic, and after that step the texts differ). Layouts: "
        "`tp3` 3 tensor-parallel ranks (one of SmolLM2's 3 kv heads each), `pp2` 2 pipeline stages (15 layers "
        "each), `tp3-ray` `tp3` on vLLM's Ray executor; all on this machine's cores in turn. Differences are "
        "against `tp1` of the same dtype from the same run. Capacity: vLLM's "
        "count per rank (the smallest over ranks), against `auto` of the same layout in bf16 (capacity-only "
        f"engines: {auto}) and in fp32.\n\n"
        f"Command: `{payload['command']}`\n\n" + "\n".join(lines) + "\n" + band_markdown(payload)
    )


def band_markdown(payload: dict) -> str:
    """The rounding band of every dtype whose tp1 ran under noise, as a table with its reading ('' if none did)."""
    rows = [r for r in payload["results"] if r.get("noisy")]
    if not rows:
        return ""
    lines = ["| kv cache dtype | seeds | ppl vs tp1 | argmax on the text = tp1's |", "|---|---:|---:|---:|"]
    for r in rows:
        ppl = [100 * n["ppl_vs_tp1"] for n in r["noisy"]]
        agree = [100 * n["argmax_agreement_with_tp1"] for n in r["noisy"]]
        lines.append(f"| {r['dtype']} | {len(ppl)} | {min(ppl):+.3f} % .. {max(ppl):+.3f} % "
                     f"| {min(agree):.2f} % .. {max(agree):.2f} % |")
    return (
        "\nThe rounding band: the `tp1` engine of each dtype on the same windows again, the output of every "
        "row-parallel layer (o_proj, down_proj: the sums that TP splits over ranks) multiplied by "
        f"1 + {payload['noise']:g} x N(0, 1), one pass per seed, against its own plain pass. For scale also: 1e-6 "
        f"Gaussian noise on the keys moves the harness's kvquant3 perplexity by {payload['key_noise_band']} on "
        "16 x 1024 tokens (`engine-equality.md`).\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="parallel-cpu")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", help="kvquant3 calibration (default: MODEL_DIR/kvquant_calibration.safetensors)")
    p.add_argument("--dtypes", default="auto,kvquant3")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"from {', '.join(LAYOUTS)}; tp1 is the reference")
    p.add_argument("--text", default="pydoc:test")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--kv-cache-mib", type=int, default=256, help="KV cache budget per rank")
    p.add_argument("--noise-seeds", type=int, default=4, help="passes of tp1 under rounding-sized noise, per dtype")
    p.add_argument("--noise", type=float, default=3e-7,
                   help="relative std of the noise on every row-parallel layer's output (3e-7: ~2.5 float32 ulps)")
    p.add_argument("--notes", type=Path, help="markdown file appended under the tables (the reading of them)")
    args = p.parse_args()
    layouts = [LAYOUTS[name] for name in args.layouts.split(",")]
    if layouts[0].name != "tp1":
        raise SystemExit("--layouts must start with tp1, the reference")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the per-rank budget
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships the noise hook to the workers by pickle

    from transformers import AutoTokenizer

    model_dir = str(resolve_model(args.model))
    tokens = tokenize(AutoTokenizer.from_pretrained(model_dir), load_text(args.text))
    windows = make_windows(tokens, args.seq_len, args.windows)
    if any("distributed_executor_backend" in layout.engine_args for layout in layouts):
        import ray

        os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # it counts every process of a shared machine
        ray.init(num_cpus=max(layout.ranks for layout in layouts), include_dashboard=False, log_to_driver=False)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    rows = [measure(model_dir, layout, dtype, windows, args) for layout in layouts for dtype in args.dtypes.split(",")]
    auto_bf16 = {layout.name: bf16_capacity(model_dir, layout, args.seq_len + 1, args.kv_cache_mib << 20)
                 for layout in layouts}
    compare(rows, auto_bf16)
    for r in rows:  # kept: the greedy tokens; the per-position argmax and logprobs only served the comparison
        del r["argmax"]
        r["greedy"] = [tokens for tokens, _ in r["greedy"]]

    cal_file = Path(args.calibration) if args.calibration else default_calibration_path(model_dir)
    info = read_calibration(cal_file).info
    # The calibration by name and what it was made from, not by where it lies on the machine that ran this.
    command = [Path(a).name if a == args.calibration else a for a in sys.argv[1:]]
    python = "python -P" if sys.flags.safe_path else "python"
    payload = {"command": f"{python} " + shlex.join(["benchmarks/parallel.py", *command]), "model": args.model,
               "calibration": f"{cal_file.name}: {info.get('text', '?')}, {info.get('samples', '?')} x "
                              f"{info.get('seq_len', '?')}",
               "text": args.text, "windows": int(windows.shape[0]), "seq_len": args.seq_len,
               "tokens": rows[0]["tokens"], "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "kv_cache_mib": args.kv_cache_mib, "noise": args.noise,
               "key_noise_band": noise_band(RESULTS / "engine-equality.json"),
               "auto_bf16_capacity_tokens": auto_bf16, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(payload, indent=2) + "\n")
    markdown = to_markdown(payload) + (f"\n{args.notes.read_text()}" if args.notes else "")
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
