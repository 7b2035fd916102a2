"""A `vllm serve` process on 127.0.0.1 for benchmarks and tests: started on a free port, its log kept in a file,
its /health, /metrics and log read back, stopped with SIGINT.

Preemptions come from /metrics (``vllm:num_preemptions_total``): vLLM 0.32's periodic stats line resets its
interval counters before it formats them, so it never prints its ``Preemptions: N`` part.

The log goes to a file rather than a pipe: a pipe that nobody drains blocks the server once it fills
(an access-log line per request fills it within a few hundred requests).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    """The server did not start, or died; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: str | os.PathLike, served_name: str, kv_cache_dtype: str, *, dtype: str = "float32",
                  max_model_len: int = 2048, num_blocks: int | None = None, calibration: str | None = None,
                  seed: int = 0, extra: list[str] | None = None) -> list[str]:
    """The `vllm serve` arguments (without host and port) of one engine: eager mode, the given KV cache dtype and,
    with ``num_blocks``, exactly that many KV blocks (``--num-gpu-blocks-override``)."""
    cmd = ["serve", str(model_dir), "--served-model-name", served_name, "--kv-cache-dtype", kv_cache_dtype,
           "--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager", "--seed", str(seed)]
    if num_blocks is not None:
        cmd += ["--num-gpu-blocks-override", str(num_blocks)]
    if calibration:
        cmd += ["--additional-config", json.dumps({"kvquant_calibration": str(calibration)})]
    return cmd + list(extra or [])


class VllmServer:
    """``vllm <args> --host 127.0.0.1 --port <free port>`` as a subprocess; use as a context manager."""

    def __init__(self, args: list[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
                 start_timeout_s: float = 1800.0) -> None:
        self.port = free_port()
        self.cmd = [str(Path(sys.executable).with_name("vllm")), *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = Path(log_path)
        self.env = os.environ | (env or {})
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process and wait until /health answers; ServerError if it exits or times out first."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"`{' '.join(self.cmd)}` exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy(timeout_s=2):
                return
            time.sleep(1)
        self.stop()
        raise ServerError(f"vllm serve did not answer /health within {self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGINT (vLLM's clean shutdown), then SIGKILL after ``timeout_s``; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout_s: float = 10.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def metrics(self) -> dict[str, float]:
        """The Prometheus metrics at /metrics, each name summed over its label sets (``vllm:num_preemptions_total``,
        ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, ...)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        totals: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                totals[m[1]] = totals.get(m[1], 0.0) + float(m[3])
        return totals

    def idle_metrics(self, timeout_s: float = 120.0) -> dict[str, float]:
        """:meth:`metrics` once the engine holds no running or waiting request (a cancelled stream is aborted
        asynchronously), or at ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            metrics = self.metrics()
            busy = metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0)
            if busy == 0 or time.monotonic() > deadline:
                return metrics
            time.sleep(1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]
