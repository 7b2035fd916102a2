"""`vllm serve MODEL --kv-cache-dtype kvquant3` answers concurrent OpenAI completions and shuts down cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(kvquant_model_dir):
    import urllib.request

    port = _free_port()
    vllm = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm), "serve", str(kvquant_model_dir), "--kv-cache-dtype", "kvquant3", "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "1024", "--dtype", "bfloat16",
           "--served-model-name", "smollm2"]
    proc = subprocess.Popen(cmd, env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{proc.stdout.read()[-4000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("vllm serve did not become healthy in 300 s")
    yield proc, f"http://127.0.0.1:{port}/v1"
    if proc.poll() is None:
        proc.kill()


def test_concurrent_completions_then_clean_shutdown(server):
    from openai import OpenAI

    proc, base_url = server
    client = OpenAI(base_url=base_url, api_key="none")
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(15)] + ["The capital of France is"]

    def complete(i: int) -> str:
        if i % 3 == 0:  # streamed
            stream = client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=12, temperature=0,
                                               stream=True, extra_body={"min_tokens": 4})
            return "".join(chunk.choices[0].text for chunk in stream)
        out = client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=12, temperature=0,
                                        extra_body={"min_tokens": 4})
        assert 4 <= out.usage.completion_tokens <= 12
        assert out.choices[0].finish_reason in ("length", "stop")
        return out.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(complete, range(16)))
    assert all(texts), texts
    assert "Paris" in texts[15]

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
