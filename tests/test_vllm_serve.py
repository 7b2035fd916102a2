"""`vllm serve MODEL --kv-cache-dtype kvquant3` with a KV cache small enough to force preemption: concurrent
greedy completions equal to the same prompts sent alone (``KVQUANT_BATCH_INVARIANT=1``), then a seeded load of
completions and chat, streaming and not, with cancelled streams, an oversize prompt and malformed requests: nothing
lost, no server error, every block freed, and a clean shutdown.
"""

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvquant_vllm.loadgen import MixConfig, drive, model_mix, summarize
from kvquant_vllm.server import VllmServer, serve_command

pytestmark = pytest.mark.slow

SERVED_NAME = "smollm2"
MAX_MODEL_LEN = 640
BLOCK_SIZE = 64
# 11 x 64 = 704 tokens of KV cache (vLLM keeps one block back, the rest holds one max_model_len request) for 16
# concurrent requests of up to 512 + 64 tokens: the engine must preempt.
NUM_BLOCKS = 11


@pytest.fixture(scope="module")
def server(kvquant_model_dir, tmp_path_factory):
    cmd = serve_command(kvquant_model_dir, SERVED_NAME, "kvquant3", dtype="float32", max_model_len=MAX_MODEL_LEN,
                        num_blocks=NUM_BLOCKS, extra=["--block-size", str(BLOCK_SIZE)])
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with VllmServer(cmd, log, env={"VLLM_CPU_KVCACHE_SPACE": "1", "KVQUANT_BATCH_INVARIANT": "1"}) as s:
        yield s


def test_concurrent_completions_equal_each_prompt_alone(server):
    """16 greedy completions at once (decode steps of many rows, in a 704-token cache) give the texts that each
    prompt gets alone (decode steps of one row)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(15)] + ["The capital of France is"]

    def complete(i: int) -> str:
        if i % 3 == 0:  # streamed
            stream = client.completions.create(model=SERVED_NAME, prompt=prompts[i], max_tokens=32, temperature=0,
                                               stream=True, extra_body={"min_tokens": 4})
            return "".join(chunk.choices[0].text for chunk in stream)
        out = client.completions.create(model=SERVED_NAME, prompt=prompts[i], max_tokens=32, temperature=0,
                                        extra_body={"min_tokens": 4})
        assert 4 <= out.usage.completion_tokens <= 32
        assert out.choices[0].finish_reason in ("length", "stop")
        return out.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(complete, range(16)))
    assert all(texts), texts
    assert "Paris" in texts[15]
    alone = [complete(i) for i in range(16)]
    assert alone == texts


def preemption_burst(server) -> None:
    """Three greedy completions whose prompts (about 300 tokens each, no shared prefix) fit the cache two at a time
    and whose answers (64 tokens each, no early stop) then outgrow it: the engine must preempt, whatever the timing of
    the load before (10 usable blocks of 64 hold 640 tokens; two such requests grow to 2 x 360)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

    def complete(i: int) -> int:
        out = client.completions.create(model=SERVED_NAME, prompt=f"Request {i}:" + " one" * 290, max_tokens=64,
                                        temperature=0, extra_body={"min_tokens": 64})
        return out.usage.completion_tokens

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(complete, range(3))) == [64] * 3


def test_load_with_preemption_and_faults_loses_nothing(server, kvquant_model_dir):
    config = MixConfig(requests=64, seed=0, max_model_len=MAX_MODEL_LEN, prompt_tokens=(8, 512), max_tokens=(1, 64),
                       cancel_fraction=0.2, shared_prefixes=2, oversize=1, malformed=2)
    specs = model_mix(str(kvquant_model_dir), config)
    before = server.metrics()
    outcomes, wall = asyncio.run(drive(server.url, SERVED_NAME, specs, concurrency=16, timeout_s=600))
    result = summarize(specs, outcomes, wall)

    assert result["failed"] == 0 and result["lost"] == 0, result["failures"]
    assert result["rejected_4xx"] == result["expected_4xx"] == 3
    assert result["cancelled"] >= 1
    assert result["completed"] + result["cancelled"] == 61
    assert server.alive() and server.healthy()
    preemption_burst(server)
    # Cancelled streams are aborted, not left running; every block is back in the free pool.
    after = server.idle_metrics(timeout_s=60)
    assert after["vllm:num_preemptions_total"] > before.get("vllm:num_preemptions_total", 0), "no preemption forced"
    assert after["vllm:num_requests_running"] + after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_clean_shutdown(server):
    assert server.alive()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0
