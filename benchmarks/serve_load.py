"""`vllm serve` under load and faults, per --kv-cache-dtype: nothing lost, server healthy after, greedy outputs
equal to offline.

For each dtype of --dtypes: starts `vllm serve` on 127.0.0.1 (a free port) with exactly --kv-tokens of KV cache
(so the mix forces preemption), sends the seeded request mix of :mod:`kvquant_vllm.loadgen` (--requests requests,
--concurrency in flight; completions and chat, streaming and not, 10 % of the streams cancelled mid-stream,
prompts over max_model_len, a negative max_tokens, an unknown model name) through the `openai` client, then
checks /health and a final request, and reads preemptions and the prefix-cache hit rate from /metrics.
Afterwards an offline `LLM(...)` of the same dtype generates every completed greedy request's prompt alone;
the texts must be equal. With --batch-invariant, the servers and the offline engines run with
`KVQUANT_BATCH_INVARIANT=1` (the plugin makes vLLM's CPU float32 linear layers batch-invariant,
kvquant_vllm/vllm_plugin/cpu_gemm.py).
Writes --json OUT and the markdown table beside it (OUT with .md).

    python benchmarks/serve_load.py --model smollm2-135m --dtypes auto,kvquant3 --requests 256 --concurrency 64

kvquant dtypes use --calibration PATH, or else the cached calibration on --calibrate-on (16 x 2048 tokens, made
once where missing).
Exits 1 if any request failed or went unaccounted, or a server was not healthy afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from kvquant_vllm.calib.run import cached_calibrations
from kvquant_vllm.engine import shutdown
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.loadgen import MixConfig, Outcome, RequestSpec, drive, model_mix, summarize
from kvquant_vllm.models import resolve_model
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.server import VllmServer, serve_command

RESULTS = Path(__file__).parent / "results"
SERVED_NAME = "served-model"
FINAL_PROMPT = "The capital of France is"


def final_request(server: VllmServer) -> bool:
    """/health answers and one more greedy completion comes back whole."""
    from openai import OpenAI

    if not server.healthy():
        return False
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        out = client.completions.create(model=SERVED_NAME, prompt=FINAL_PROMPT, max_tokens=8, temperature=0)
    except Exception:
        return False
    return out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1


def calibration_for(dtype: str, args: argparse.Namespace) -> str | None:
    """The calibration file of a kvquant ``dtype`` (--calibration, or the cached one); None for other dtypes."""
    methods = kvquant_methods()
    if dtype not in methods:
        return None
    if args.calibration:
        return args.calibration
    spec = methods[dtype].spec
    return str(cached_calibrations(args.model, [spec], args.calibrate_on, samples=16, seq_len=2048)[spec])


def serve_and_load(model_dir: str, dtype: str, calibration: str | None, specs: list[RequestSpec],
                   args: argparse.Namespace, log_dir: Path) -> tuple[dict, list[Outcome]]:
    num_blocks = args.kv_tokens // args.block_size
    cmd = serve_command(model_dir, SERVED_NAME, dtype, dtype=args.model_dtype, max_model_len=args.max_model_len,
                        num_blocks=num_blocks, calibration=calibration, seed=args.seed,
                        extra=["--block-size", str(args.block_size), *shlex.split(args.serve_args)])
    load_before = os.getloadavg()[0]
    with VllmServer(cmd, log_dir / f"serve-{dtype}.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        print(f"[{dtype}] serving on {server.url}, log {server.log_path}", flush=True)
        outcomes, wall = asyncio.run(drive(server.url, SERVED_NAME, specs, args.concurrency, args.request_timeout))
        # A server that died under the load has no metrics; its requests already count as failed.
        metrics = server.idle_metrics() if server.healthy() else {}
        healthy = final_request(server)
        row = {"dtype": dtype, **summarize(specs, outcomes, wall), "healthy_after": healthy,
               "preemptions": int(metrics.get("vllm:num_preemptions_total", 0)),
               "requests_in_engine_after": int(metrics.get("vllm:num_requests_running", 0)
                                               + metrics.get("vllm:num_requests_waiting", 0)),
               "kv_cache_usage_after": metrics.get("vllm:kv_cache_usage_perc"),
               "prefix_cache_hit_rate": (metrics.get("vllm:prefix_cache_hits_total", 0)
                                         / max(1.0, metrics.get("vllm:prefix_cache_queries_total", 0))),
               "kv_blocks": num_blocks, "block_size": args.block_size}
    row["exit_code"] = server.proc.returncode
    row["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    print(f"[{dtype}] {json.dumps({k: v for k, v in row.items() if k != 'failures'})}", flush=True)
    return row, outcomes


def offline_alone(model_dir: str, dtype: str, calibration: str | None, requests: list[tuple[list[int], int]],
                  args: argparse.Namespace) -> list:
    """Each (prompt token ids, max_tokens) generated greedily alone by an offline engine of the same dtype:
    the CompletionOutputs, with the top-5 logprobs of every generated position."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"additional_config": {"kvquant_calibration": calibration}} if calibration else {}
    # A KV budget of its own: without one, vLLM's CPU worker refuses to start unless 92 % of the machine's
    # memory is free (the server gets VLLM_CPU_KVCACHE_SPACE instead).
    llm = LLM(model=model_dir, kv_cache_dtype=dtype, dtype=args.model_dtype, enforce_eager=True, seed=args.seed,
              max_model_len=args.max_model_len, block_size=args.block_size, kv_cache_memory_bytes=1 << 30, **extra)
    try:
        return [llm.generate([TokensPrompt(prompt_token_ids=ids)],
                             SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5),
                             use_tqdm=False)[0].outputs[0]
                for ids, max_tokens in requests]
    finally:
        shutdown(llm)


def divergence(served: Outcome, offline) -> dict:
    """Where a served greedy answer leaves the offline one, and by how much the offline engine preferred its own
    token there (logprob margin over the served token; a lower bound when that is not in the offline top 5)."""
    k = next((i for i, (a, b) in enumerate(zip(served.token_ids, offline.token_ids)) if a != b),
             min(len(served.token_ids), len(offline.token_ids)))
    info = {"index": served.index, "first_diff_token": k, "served_tokens": len(served.token_ids),
            "offline_tokens": len(offline.token_ids), "offline_margin": None, "margin_is_lower_bound": False}
    if k < len(served.token_ids) and k < len(offline.token_ids) and offline.logprobs:
        top = {t: lp.logprob for t, lp in offline.logprobs[k].items()}
        mine = top[offline.token_ids[k]]
        theirs = top.get(served.token_ids[k], min(top.values()))
        info |= {"offline_margin": mine - theirs, "margin_is_lower_bound": served.token_ids[k] not in top}
    return info


def greedy_check(model_dir: str, dtype: str, calibration: str | None, specs: list[RequestSpec],
                 outcomes: list[Outcome], args: argparse.Namespace) -> dict:
    done = [o for o in outcomes if o.status == "completed" and specs[o.index].greedy]
    requests = [(o.prompt_token_ids, specs[o.index].max_tokens) for o in done]
    offline = offline_alone(model_dir, dtype, calibration, requests, args)
    differ = [divergence(o, ref) for o, ref in zip(done, offline) if o.text != ref.text or o.token_ids != ref.token_ids]
    return {"greedy_compared": len(done), "greedy_mismatches": len(differ),
            "greedy_mismatch_fraction": len(differ) / max(1, len(done)), "mismatches": differ}


def fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def to_markdown(rows: list[dict], payload: dict) -> str:
    mix = payload["mix"]
    lines = [
        "# `vllm serve` under load and faults",
        "",
        f"Model `{payload['model']}` ({payload['model_dtype']} weights and activations), {mix['requests']} requests "
        f"at concurrency {payload['concurrency']} (seed {mix['seed']}), KV cache of exactly {payload['kv_tokens']:,} "
        f"tokens per server ({payload['block_size']}-token blocks, `--num-gpu-blocks-override`), max_model_len "
        f"{mix['max_model_len']}; {payload['machine']}"
        + ("; servers and offline engines with `KVQUANT_BATCH_INVARIANT=1` (batch-invariant linear layers)."
           if payload.get("batch_invariant") else "."),
        "",
        f"Command: `{payload['command']}`",
        "",
        "| kv cache dtype | completed | cancelled | rejected 4xx | failed | preemptions | output tok/s | requests/s "
        "| TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | healthy after | greedy compared | greedy mismatches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['completed']} | {r['cancelled']} | {r['rejected_4xx']} | {r['failed'] + r['lost']} "
            f"| {r['preemptions']} | {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.3f} "
            f"| {fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p99_s'])} | {fmt(r['itl_p50_s'], 1e3, 0)} / "
            f"{fmt(r['itl_p99_s'], 1e3, 0)} | {'yes' if r['healthy_after'] else 'NO'} "
            f"| {r.get('greedy_compared', '-')} | {r.get('greedy_mismatches', '-')} |")
    for r in rows:
        if r["failures"]:
            lines += ["", f"Failures ({r['dtype']}):", *(f"- {f}" for f in r["failures"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or local model directory")
    p.add_argument("--dtypes", default="auto,kvquant3")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=RESULTS / "serve-load-cpu.json",
                   help="JSON output; the markdown table goes beside it (.md)")
    p.add_argument("--kv-tokens", type=int, default=8192, help="KV cache per server, in tokens (same for every dtype)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--model-dtype", default="float32", help="weights/activations (float32: greedy text comparable)")
    p.add_argument("--calibration", help="kvquant calibration file (default: the cached one on --calibrate-on)")
    p.add_argument("--calibrate-on", default="pydoc:train+chat:train", help="calibration text when no --calibration")
    p.add_argument("--request-timeout", type=float, default=1800.0,
                   help="seconds without a byte before a request fails")
    p.add_argument("--no-reference", action="store_true", help="skip the offline greedy comparison")
    p.add_argument("--serve-args", default="", help="more `vllm serve` arguments, one string")
    p.add_argument("--log-dir", type=Path, help="where the server logs go (default: a temporary directory)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="run the servers and the offline engines with KVQUANT_BATCH_INVARIANT=1")
    p.add_argument("--notes", type=Path, help="markdown file appended under the table (the reading of it)")
    args = p.parse_args()
    if args.batch_invariant:
        os.environ["KVQUANT_BATCH_INVARIANT"] = "1"  # inherited by the servers and the offline engines' workers

    model_dir = str(resolve_model(args.model))
    config = MixConfig(requests=args.requests, seed=args.seed, max_model_len=args.max_model_len)
    specs = model_mix(model_dir, config)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="serve-load-"))
    command = "python " + shlex.join(["benchmarks/serve_load.py", *sys.argv[1:]])
    payload = {"command": command, "model": args.model, "model_dtype": args.model_dtype,
               "concurrency": args.concurrency, "batch_invariant": args.batch_invariant,
               "kv_tokens": args.kv_tokens, "block_size": args.block_size,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "mix": config.__dict__, "results": []}
    rows = payload["results"]
    for dtype in args.dtypes.split(","):
        calibration = calibration_for(dtype, args)
        row, outcomes = serve_and_load(model_dir, dtype, calibration, specs, args, log_dir)
        row["calibration"] = Path(calibration).name if calibration else None
        if not args.no_reference:
            row |= greedy_check(model_dir, dtype, calibration, specs, outcomes, args)
            print(f"[{dtype}] greedy: {row['greedy_mismatches']} of {row['greedy_compared']} differ", flush=True)
        rows.append(row)
        # Written after every dtype, so that a run stopped part-way keeps the rows it finished.
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        markdown = to_markdown(rows, payload) + (f"\n{args.notes.read_text()}" if args.notes else "")
        atomic_write_text(args.json.with_suffix(".md"), markdown)
    print(markdown)
    ok = all(r["failed"] == 0 and r["lost"] == 0 and r["healthy_after"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
