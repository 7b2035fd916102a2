"""Batch-invariant float32 linear layers on vLLM's CPU platform, under ``KVQUANT_BATCH_INVARIANT=1``.

vLLM's CPU linear layers run oneDNN's matmul (``ops.onednn_mm``), which gives a row computed alone (M = 1) different
last bits than the same row in any call of M >= 2 for some shapes, while calls of M >= 2 agree with each other
(``benchmarks/cpu_gemm_rows.py``: SmolLM2's down projection, K = 1536). An offline engine decoding one request runs
M = 1, a server decoding several runs M >= 2; a 3-bit cache turns those roundings into code steps, and greedy texts
part (``benchmarks/results/serve-load-cpu.md``). With ``KVQUANT_BATCH_INVARIANT=1`` in the environment of every vLLM
process, the plugin computes each one-row call as two copies of the row and keeps the first: a batch-1 decode step
reads each weight once as before, for twice the (small) arithmetic.

vLLM's own ``VLLM_BATCH_INVARIANT=1`` cannot do this on CPU: in vLLM 0.32 it replaces aten's reductions with Triton
GPU kernels in every worker, and the CPU worker's first RMSNorm fails. Covers the oneDNN path (float32 weights, and
bf16 weights too large for vLLM's AMX kernel); the kvquant CPU attention is batch-invariant by construction
(``kvquant_vllm/kernels/cpu.py``).
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "KVQUANT_BATCH_INVARIANT"


def batch_invariant_onednn_mm(onednn_mm):
    """``onednn_mm(handler, x, bias)`` that computes a single row [1, K] (or [K]) as two rows: the same bits as
    in a call of M >= 2."""

    def onednn_mm_rows(handler, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() != x.size(-1):
            return onednn_mm(handler, x, bias)
        rows = x.reshape(1, -1).expand(2, -1).contiguous()  # [2, K]
        return onednn_mm(handler, rows, bias)[:1].reshape(*x.shape[:-1], handler.n)

    onednn_mm_rows._kvquant = True
    return onednn_mm_rows


def make_cpu_gemm_batch_invariant() -> None:
    """With ``KVQUANT_BATCH_INVARIANT=1`` on the CPU platform, route vLLM's oneDNN matmul through
    :func:`batch_invariant_onednn_mm` (no-op otherwise; idempotent). vLLM's CPU linear layers look the op up on
    ``vllm._custom_ops`` at every call, so layers built before this still take it."""
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    if os.environ.get(ENV_VAR, "0") in ("", "0") or not current_platform.is_cpu():
        return
    if not getattr(ops.onednn_mm, "_kvquant", False):
        ops.onednn_mm = batch_invariant_onednn_mm(ops.onednn_mm)
