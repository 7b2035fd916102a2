"""Perplexity and greedy agreement from a running vLLM engine: prompt logprobs of the same token sequences the
harness scores.

With a kvquant cache dtype every prompt token's logprob comes from attention over the quantized pages, so these
equal the fake-quant harness's numbers for the same method and calibration (within the quantized model's noise).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from kvquant_vllm.eval.agreement import ChatAnswer


def _prompt_logprobs(llm, sequences: list[list[int]], top: int) -> list[list[dict | None]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    return [out.prompt_logprobs for out in outs]


def vllm_window_nll(llm, windows: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood and count of predicted tokens of ``windows`` [n, seq_len]."""
    total, count = 0.0, 0
    for window, logprobs in zip(windows.tolist(), _prompt_logprobs(llm, windows.tolist(), 0)):
        for token, lp in zip(window[1:], logprobs[1:]):
            total -= lp[token].logprob
            count += 1
    return total, count


def vllm_perplexity(llm, windows: torch.Tensor) -> float:
    nll, count = vllm_window_nll(llm, windows)
    return math.exp(nll / count)


def vllm_agreement(llm, answers: Sequence[ChatAnswer]) -> tuple[int, int]:
    """(answer tokens that are the engine's argmax given the prompt and the answer so far, answer tokens):
    :func:`kvquant_vllm.eval.agreement.teacher_forced` computed by the engine."""
    agree, count = 0, 0
    sequences = [a.prompt + a.answer for a in answers]
    for a, logprobs in zip(answers, _prompt_logprobs(llm, sequences, 1)):
        for token, lp in zip(a.answer, logprobs[len(a.prompt):]):
            agree += lp[token].rank == 1
            count += 1
    return agree, count
