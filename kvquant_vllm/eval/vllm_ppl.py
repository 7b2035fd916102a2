"""Perplexity from a running vLLM engine: prompt logprobs of the same windows the harness uses.

With a kvquant cache dtype every prompt token's logprob comes from attention over the quantized
pages, so this equals the fake-quant harness's number for the same method and calibration.
"""

from __future__ import annotations

import math

import torch


def vllm_window_nll(llm, windows: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood and count of predicted tokens of ``windows`` [n, seq_len]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    total, count = 0.0, 0
    for window, out in zip(windows.tolist(), llm.generate(prompts, params, use_tqdm=False)):
        for token, logprobs in zip(window[1:], out.prompt_logprobs[1:]):
            total -= logprobs[token].logprob
            count += 1
    return total, count


def vllm_perplexity(llm, windows: torch.Tensor) -> float:
    nll, count = vllm_window_nll(llm, windows)
    return math.exp(nll / count)
